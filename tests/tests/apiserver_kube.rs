//! Faithfulness of the test API server: kube-rs's own `Api`, `watcher`,
//! `reflector`, `metadata_watcher` and `Controller` run against it unmodified.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use ipvs_operator::crd::{WeightedService, WeightedServiceSpec, WeightedServiceStatus};
use ipvs_operator_tests::apiserver::{Config, FailRule, Grace, TestApiServer};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher::{self, Event};
#[allow(deprecated)]
use kube::runtime::metadata_watcher;
use kube::runtime::{WatchStreamExt, reflector};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(10);

async fn server() -> TestApiServer {
    let cfg = Config { bookmark_interval: Duration::from_millis(200), ..Config::default() };
    TestApiServer::start(cfg).await.expect("server starts")
}

/// Polls `f` until it returns `Some`, or panics after [`WAIT`].
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn cm(name: &str, labels: &[(&str, &str)]) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([("k".to_string(), "v".to_string())])),
        ..Default::default()
    }
}

const APP: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: default
  annotations:
    test-apiserver.codesink.net/pod-ips: "10.1.0.10,10.1.0.11"
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web, env: prod}}
    spec:
      containers:
      - name: web
        image: busybox
        ports: [{name: www, containerPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: www}]
"#;

#[tokio::test]
async fn crud_conflict_and_error_statuses() {
    let s = server().await;
    let api: Api<ConfigMap> = Api::namespaced(s.client().expect("client"), "default");
    let created = api.create(&PostParams::default(), &cm("a", &[("x", "1")])).await.expect("create");
    assert!(created.metadata.uid.is_some() && created.metadata.creation_timestamp.is_some());
    let err = api.create(&PostParams::default(), &cm("a", &[])).await.expect_err("duplicate");
    assert!(matches!(&err, kube::Error::Api(s) if s.code == 409 && s.reason == "AlreadyExists"), "{err:?}");

    let mut fresh = created.clone();
    fresh.data = Some(BTreeMap::from([("k".to_string(), "w".to_string())]));
    let updated = api.replace("a", &PostParams::default(), &fresh).await.expect("update");
    assert_ne!(updated.resource_version(), created.resource_version());
    let err = api.replace("a", &PostParams::default(), &fresh).await.expect_err("stale update");
    assert!(matches!(&err, kube::Error::Api(s) if s.code == 409 && s.reason == "Conflict"), "{err:?}");

    let err = api.get("missing").await.expect_err("missing");
    assert!(matches!(&err, kube::Error::Api(s) if s.code == 404 && s.reason == "NotFound"), "{err:?}");
    assert!(api.get_opt("missing").await.expect("get_opt").is_none());

    let merged = api
        .patch("a", &PatchParams::default(), &Patch::Merge(json!({"data": {"j": "x", "k": null}})))
        .await
        .expect("merge patch");
    assert_eq!(merged.data, Some(BTreeMap::from([("j".to_string(), "x".to_string())])));

    let other_ns: Api<ConfigMap> = Api::namespaced(s.client().expect("client"), "nowhere");
    let err = other_ns.create(&PostParams::default(), &cm("a", &[])).await.expect_err("no namespace");
    assert!(matches!(&err, kube::Error::Api(s) if s.code == 404), "{err:?}");

    let json_patched = api
        .patch("a", &PatchParams::default(), &Patch::Json::<()>(serde_json::from_value(json!([{"op": "add", "path": "/data/z", "value": "1"}])).expect("patch")))
        .await
        .expect("JSON patch");
    assert_eq!(json_patched.data.as_ref().and_then(|d| d.get("z")).map(String::as_str), Some("1"));

    api.delete("a", &DeleteParams::default()).await.expect("delete");
    assert!(api.get_opt("a").await.expect("get_opt").is_none());

    // deletecollection with a selector, and a namespace taking its contents with it.
    let client = s.client().expect("client");
    let nss: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let ns = k8s_openapi::api::core::v1::Namespace { metadata: ObjectMeta { name: Some("scratch".into()), ..Default::default() }, ..Default::default() };
    nss.create(&PostParams::default(), &ns).await.expect("namespace");
    let scratch: Api<ConfigMap> = Api::namespaced(client, "scratch");
    for (n, l) in [("x", "gone"), ("y", "gone"), ("z", "kept")] {
        scratch.create(&PostParams::default(), &cm(n, &[("t", l)])).await.expect("create");
    }
    scratch.delete_collection(&DeleteParams::default(), &ListParams::default().labels("t=gone")).await.expect("deletecollection");
    let left: Vec<String> = scratch.list(&ListParams::default()).await.expect("list").items.iter().map(|c| c.name_any()).collect();
    assert_eq!(left, ["z"]);
    nss.delete("scratch", &DeleteParams::default()).await.expect("delete namespace");
    assert!(nss.get_opt("scratch").await.expect("get").is_none());
    assert!(s.handle().list("configmaps", Some("scratch")).is_empty());
}

#[tokio::test]
async fn selectors_and_pagination() {
    let s = server().await;
    let api: Api<ConfigMap> = Api::namespaced(s.client().expect("client"), "default");
    for (name, env) in [("a", "prod"), ("b", "canary"), ("c", "prod"), ("d", "dev"), ("e", "prod")] {
        api.create(&PostParams::default(), &cm(name, &[("env", env)])).await.expect("create");
    }
    let names = |l: kube::core::ObjectList<ConfigMap>| l.items.iter().map(|c| c.name_any()).collect::<Vec<_>>();
    let l = api.list(&ListParams::default().labels("env=prod")).await.expect("list");
    assert_eq!(names(l), ["a", "c", "e"]);
    let l = api.list(&ListParams::default().labels("env in (canary,dev)")).await.expect("list");
    assert_eq!(names(l), ["b", "d"]);
    let l = api.list(&ListParams::default().labels("env notin (prod),env!=dev")).await.expect("list");
    assert_eq!(names(l), ["b"]);
    let l = api.list(&ListParams::default().labels("!env")).await.expect("list");
    assert!(l.items.is_empty());
    let l = api.list(&ListParams::default().fields("metadata.name=c")).await.expect("list");
    assert_eq!(names(l), ["c"]);
    let err = api.list(&ListParams::default().labels("env in (")).await.expect_err("bad selector");
    assert!(matches!(&err, kube::Error::Api(s) if s.code == 400 && s.reason == "BadRequest"), "{err:?}");

    let first = api.list(&ListParams::default().limit(2)).await.expect("page 1");
    let token = first.metadata.continue_.clone().expect("a continue token");
    assert_eq!(names(first.clone()), ["a", "b"]);
    let second = api.list(&ListParams::default().limit(2).continue_token(&token)).await.expect("page 2");
    assert_eq!(names(second.clone()), ["c", "d"]);
    assert_eq!(second.metadata.resource_version, first.metadata.resource_version);

    // All-namespaces list through /api/v1/configmaps.
    let all: Api<ConfigMap> = Api::all(s.client().expect("client"));
    assert_eq!(all.list(&ListParams::default()).await.expect("all").items.len(), 5);
}

#[tokio::test]
async fn watcher_relists_after_410_and_resumes_after_a_dropped_connection() {
    let s = server().await;
    let client = s.client().expect("client");
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    api.create(&PostParams::default(), &cm("first", &[])).await.expect("create");

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let w = watcher::watcher(api.clone(), watcher::Config::default()).default_backoff();
    let task = tokio::spawn(async move {
        let mut w = std::pin::pin!(w);
        while let Some(e) = w.next().await {
            let label = match e {
                Ok(Event::Init) => "init".to_string(),
                Ok(Event::InitApply(o)) => format!("initapply:{}", o.name_any()),
                Ok(Event::InitDone) => "initdone".to_string(),
                Ok(Event::Apply(o)) => format!("apply:{}", o.name_any()),
                Ok(Event::Delete(o)) => format!("delete:{}", o.name_any()),
                Err(e) => format!("error:{e}"),
            };
            if tx.send(label).is_err() {
                return;
            }
        }
    });
    let mut seen = Vec::new();
    let mut wait_for = async |want: &str, seen: &mut Vec<String>| {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let got = tokio::time::timeout_at(deadline, rx.recv()).await.unwrap_or_else(|_| panic!("no {want:?}; saw {seen:?}"));
            let got = got.expect("watcher alive");
            seen.push(got.clone());
            if got == want {
                return;
            }
        }
    };
    wait_for("initapply:first", &mut seen).await;
    wait_for("initdone", &mut seen).await;
    api.create(&PostParams::default(), &cm("second", &[])).await.expect("create");
    wait_for("apply:second", &mut seen).await;

    // A dropped connection: the watcher resumes from its resourceVersion, no relist.
    let lists_before = s.handle().requests().iter().filter(|r| r.verb == "list").count();
    s.handle().break_watches();
    tokio::time::sleep(Duration::from_millis(100)).await;
    api.create(&PostParams::default(), &cm("third", &[])).await.expect("create");
    wait_for("apply:third", &mut seen).await;
    let lists_after = s.handle().requests().iter().filter(|r| r.verb == "list").count();
    assert_eq!(lists_before, lists_after, "a resumed watch does not relist");

    // Expired resourceVersions: the next watch gets 410 and the watcher relists.
    s.handle().expire_resource_versions();
    s.handle().close_watches();
    wait_for("init", &mut seen).await;
    wait_for("initdone", &mut seen).await;
    assert!(seen.iter().any(|e| e.contains("410") || e.contains("too old")), "the 410 reached the watcher: {seen:?}");
    api.create(&PostParams::default(), &cm("fourth", &[])).await.expect("create");
    wait_for("apply:fourth", &mut seen).await;
    api.delete("first", &DeleteParams::default()).await.expect("delete");
    wait_for("delete:first", &mut seen).await;
    task.abort();
}

#[tokio::test]
async fn apply_is_idempotent_and_status_is_a_subresource() {
    let s = server().await;
    let client = s.client().expect("client");
    let api: Api<WeightedService> = Api::namespaced(client.clone(), "default");
    let mut ws = WeightedService::new("shop", WeightedServiceSpec::default());
    ws.spec.service.selector = Some(BTreeMap::from([("app".into(), "shop".into())]));
    ws.spec.scheduler = Some("wrr".into());
    let pp = PatchParams::apply("test").force();
    let first = api.patch("shop", &pp, &Patch::Apply(&ws)).await.expect("apply creates");
    let again = api.patch("shop", &pp, &Patch::Apply(&ws)).await.expect("apply again");
    assert_eq!(first.resource_version(), again.resource_version(), "same apply, same resourceVersion");
    assert_eq!(first.metadata.generation, Some(1));

    let status = WeightedServiceStatus { observed_generation: Some(1), message: Some("ok".into()), ..Default::default() };
    let patched = api
        .patch_status(
            "shop",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"scheduler": "rr"}, "status": status})),
        )
        .await
        .expect("status patch");
    assert_eq!(patched.spec.scheduler.as_deref(), Some("wrr"), "a status patch does not touch spec");
    assert_eq!(patched.status.as_ref().and_then(|s| s.message.as_deref()), Some("ok"));
    assert_eq!(patched.metadata.generation, Some(1));

    let main = api
        .patch("shop", &PatchParams::default(), &Patch::Merge(json!({"spec": {"scheduler": "wlc"}, "status": {"message": "no"}})))
        .await
        .expect("main patch");
    assert_eq!(main.spec.scheduler.as_deref(), Some("wlc"));
    assert_eq!(main.status.as_ref().and_then(|s| s.message.as_deref()), Some("ok"), "a main-resource patch does not touch status");
    assert_eq!(main.metadata.generation, Some(2), "a spec change bumps generation");

    // The merge patch took `scheduler` over (an Update entry in
    // managedFields): an apply that stops setting it leaves it, as on a real server.
    let updater = main.metadata.managed_fields.iter().flatten().find(|e| e.operation.as_deref() == Some("Update"));
    assert!(updater.is_some(), "the merge patch is recorded: {:?}", main.metadata.managed_fields);
    ws.spec.scheduler = None;
    let kept = api.patch("shop", &pp, &Patch::Apply(&ws)).await.expect("apply without scheduler");
    assert_eq!(kept.spec.scheduler.as_deref(), Some("wlc"));
    // Forced back to this manager, and then dropped by it: gone.
    ws.spec.scheduler = Some("sh".into());
    api.patch("shop", &pp, &Patch::Apply(&ws)).await.expect("apply takes scheduler back");
    ws.spec.scheduler = None;
    let dropped = api.patch("shop", &pp, &Patch::Apply(&ws)).await.expect("apply without scheduler");
    assert_eq!(dropped.spec.scheduler, None);
    // Without force, changing a field another manager owns is a conflict.
    let other = PatchParams::apply("someone-else");
    let mut theirs = ws.clone();
    theirs.spec.service.selector = Some(BTreeMap::from([("app".into(), "other".into())]));
    let err = api.patch("shop", &other, &Patch::Apply(&theirs)).await.expect_err("a conflict");
    assert!(matches!(&err, kube::Error::Api(s) if s.code == 409 && s.message.starts_with("Apply failed with 1 conflict: conflict with \"test\" using codesink.net/v1alpha1: .spec.selector")), "{err:?}");

    // Services keep their ClusterIP across applies that omit it.
    let svcs: Api<Service> = Api::namespaced(client, "default");
    let svc = Service {
        metadata: ObjectMeta { name: Some("shop".into()), ..Default::default() },
        spec: Some(ServiceSpec {
            type_: Some("NodePort".into()),
            selector: Some(BTreeMap::from([("app".into(), "shop".into())])),
            ports: Some(vec![ServicePort { port: 80, target_port: Some(IntOrString::Int(8080)), ..Default::default() }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    let a = svcs.patch("shop", &pp, &Patch::Apply(&svc)).await.expect("apply service");
    let b = svcs.patch("shop", &pp, &Patch::Apply(&svc)).await.expect("apply service again");
    let ip = a.spec.as_ref().and_then(|s| s.cluster_ip.clone()).expect("a ClusterIP");
    assert!(ip.starts_with("10.9") || ip.starts_with("10.10") || ip.starts_with("10.11"), "{ip} from 10.96.0.0/12");
    assert_eq!(b.spec.as_ref().and_then(|s| s.cluster_ip.clone()), Some(ip));
    assert_eq!(a.resource_version(), b.resource_version());
    let np = a.spec.as_ref().and_then(|s| s.ports.as_ref()).and_then(|p| p[0].node_port).expect("a node port");
    assert!((30000..=32767).contains(&np));
}

#[tokio::test]
async fn metadata_watcher_and_reflector_follow_pods() {
    let s = server().await;
    s.handle().load_manifests(APP).expect("manifests");
    let client = s.client().expect("client");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");

    let (reader, writer) = reflector::store();
    let refl = reflector(writer, watcher::watcher(pods.clone(), watcher::Config::default()))
        .default_backoff()
        .applied_objects()
        .for_each(|_| async {});
    let refl = tokio::spawn(refl);

    let labels = Arc::new(std::sync::Mutex::new(BTreeMap::<String, BTreeMap<String, String>>::new()));
    let l2 = labels.clone();
    #[allow(deprecated)]
    let meta = tokio::spawn(
        metadata_watcher(pods.clone(), watcher::Config::default())
            .default_backoff()
            .applied_objects()
            .try_for_each(move |m| {
                let l2 = l2.clone();
                async move {
                    if let Ok(mut l) = l2.lock() {
                        l.insert(m.name_any(), m.labels().clone());
                    }
                    Ok(())
                }
            }),
    );

    reader.wait_until_ready().await.expect("reflector ready");
    let ips = eventually("two pods with IPs", || {
        let reader = reader.clone();
        async move {
            let mut ips: Vec<String> = reader.state().iter().filter_map(|p| p.status.as_ref()?.pod_ip.clone()).collect();
            ips.sort();
            (ips.len() == 2).then_some(ips)
        }
    })
    .await;
    assert_eq!(ips, ["10.1.0.10", "10.1.0.11"]);

    let name = reader.state()[0].name_any();
    s.handle().set_pod_label("default", &name, "env", Some("canary")).expect("relabel");
    eventually("the metadata watch sees the new label", || {
        let labels = labels.clone();
        let name = name.clone();
        async move {
            let l = labels.lock().ok()?;
            (l.get(&name)?.get("env").map(String::as_str) == Some("canary")).then_some(())
        }
    })
    .await;
    // The non-deprecated form: Api<PartialObjectMeta<_>> asks for metadata only too.
    let partial: Api<kube::core::PartialObjectMeta<Pod>> = Api::namespaced(client.clone(), "default");
    let listed = partial.list(&ListParams::default()).await.expect("metadata list");
    assert_eq!(listed.items.len(), 2);
    assert!(listed.items.iter().all(|m| m.metadata.labels.as_ref().is_some_and(|l| l.contains_key("app"))));
    let meta_requests: Vec<_> = s.handle().requests().into_iter().filter(|r| r.resource == "pods" && r.verb == "watch").collect();
    assert!(meta_requests.len() >= 2, "a full and a metadata watch of pods: {meta_requests:?}");
    refl.abort();
    meta.abort();
}

/// The one slice of the Service the `lp` selects once `ok` holds for it, as
/// a client waits for the EndpointSlice controller (it writes a moment after
/// the pods change).
async fn slice_when(slices: &Api<EndpointSlice>, lp: &ListParams, what: &str, ok: impl Fn(&EndpointSlice) -> bool) -> EndpointSlice {
    eventually(what, || {
        let (slices, lp) = (slices.clone(), lp.clone());
        let ok = &ok;
        async move {
            let mut items = slices.list(&lp).await.ok()?.items;
            (items.len() == 1 && ok(&items[0])).then(|| items.remove(0))
        }
    })
    .await
}

#[tokio::test]
async fn endpoint_slices_follow_pods_through_readiness_and_graceful_deletion() {
    let s = server().await;
    s.handle().load_manifests(APP).expect("manifests");
    let client = s.client().expect("client");
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let lp = ListParams::default().labels("kubernetes.io/service-name=web");
    let slice = slice_when(&slices, &lp, "the Service's slice", |sl| eps(sl).len() == 2).await;
    let ports = slice.ports.clone().unwrap_or_default();
    assert_eq!(ports.len(), 1);
    assert_eq!((ports[0].name.as_deref(), ports[0].port), (Some("http"), Some(8080)), "named targetPort resolved");
    assert!(eps(&slice).iter().all(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true)));
    let owner = slice.owner_references().first().map(|o| o.kind.clone());
    assert_eq!(owner.as_deref(), Some("Service"));

    let pod = s.handle().list("pods", Some("default")).into_iter().find(|p| p["status"]["podIP"] == "10.1.0.10").expect("pod");
    let pod_name = pod["metadata"]["name"].as_str().unwrap_or_default().to_string();
    let endpoint_of = |sl: &EndpointSlice, ip: &str| {
        eps(sl).iter().find(|e| e.addresses.iter().any(|a| a == ip)).and_then(|e| e.conditions.clone())
    };
    let conditions = |sl: &EndpointSlice, ip: &str| endpoint_of(sl, ip).map(|c| (c.ready, c.serving, c.terminating));

    s.handle().set_pod_ready("default", &pod_name, false).expect("unready");
    slice_when(&slices, &lp, "the endpoint unready", |sl| conditions(sl, "10.1.0.10") == Some((Some(false), Some(false), Some(false))))
        .await;
    s.handle().set_pod_ready("default", &pod_name, true).expect("ready");
    slice_when(&slices, &lp, "the endpoint ready", |sl| conditions(sl, "10.1.0.10") == Some((Some(true), Some(true), Some(false)))).await;

    s.handle().delete_pod("default", &pod_name, Grace::UntilFinished).expect("graceful delete");
    // The Deployment replaces the pod: a new one, with the next free listed IP... none is free, so from the pool.
    let sl = slice_when(&slices, &lp, "the terminating endpoint and its replacement", |sl| {
        conditions(sl, "10.1.0.10") == Some((Some(false), Some(true), Some(true))) && eps(sl).len() == 3
    })
    .await;
    assert_eq!(eps(&sl).len(), 3);

    s.handle().finish_pod_termination("default", &pod_name).expect("finish");
    let sl = slice_when(&slices, &lp, "the endpoint gone after termination", |sl| endpoint_of(sl, "10.1.0.10").is_none()).await;
    assert_eq!(eps(&sl).len(), 2);

    // Deleting through the API: terminating for the configured grace (1 s), then gone.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods.delete(&pod_name_of(&s, "10.1.0.11"), &DeleteParams::default()).await.expect("api delete");
    slice_when(&slices, &lp, "the endpoint terminating", |sl| endpoint_of(sl, "10.1.0.11").and_then(|c| c.terminating) == Some(true))
        .await;
    slice_when(&slices, &lp, "the kubelet ends the pod", |sl| endpoint_of(sl, "10.1.0.11").is_none()).await;

    // Deleting the Service garbage-collects its slices (with it: the garbage collector is not delayed).
    Api::<Service>::namespaced(client, "default").delete("web", &DeleteParams::default()).await.expect("delete svc");
    assert!(slices.list(&lp).await.expect("slices").items.is_empty());
}

/// A Service of `n` pods (fixed IPs, created directly), loaded at once.
fn many_pods(n: usize) -> String {
    let mut y = String::from("apiVersion: v1\nkind: Service\nmetadata: {name: many, namespace: default}\nspec: {selector: {app: many}, ports: [{port: 80}]}\n");
    for i in 0..n {
        y += &format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: many-{i:03}, namespace: default, labels: {{app: many}}, \
             annotations: {{test-apiserver.codesink.net/pod-ip: 10.2.{}.{}}}}}\nspec: {{containers: [{{name: c, image: x}}]}}\n",
            i / 200,
            10 + i % 200
        );
    }
    y
}

/// Every slice of Service `many` holds at most 100 endpoints, and together
/// they hold each address once: the sorted addresses.
fn covered(slices: &[EndpointSlice]) -> Vec<String> {
    let mut all: Vec<String> = Vec::new();
    for sl in slices {
        assert!(eps(sl).len() <= 100, "a slice of {} endpoints", eps(sl).len());
        all.extend(eps(sl).iter().flat_map(|e| e.addresses.clone()));
    }
    let n = all.len();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), n, "an endpoint in two slices");
    all
}

#[tokio::test]
async fn a_large_service_gets_several_slices_of_at_most_100() {
    let s = server().await;
    s.handle().load_manifests(&many_pods(250)).expect("manifests");
    let slices: Api<EndpointSlice> = Api::namespaced(s.client().expect("client"), "default");
    let lp = ListParams::default().labels("kubernetes.io/service-name=many");
    // A sync may come in two moments: wait for all 250.
    let all = eventually("250 endpoints in slices", || {
        let (slices, lp) = (slices.clone(), lp.clone());
        async move {
            let items = slices.list(&lp).await.ok()?.items;
            (items.iter().map(|sl| eps(sl).len()).sum::<usize>() == 250).then_some(items)
        }
    })
    .await;
    assert_eq!(all.len(), 3, "250 endpoints: 3 slices");
    let mut want: Vec<String> = (0..250).map(|i| format!("10.2.{}.{}", i / 200, 10 + i % 200)).collect();
    want.sort();
    assert_eq!(covered(&all), want);

    // Scale to 150: 100 pods go.
    for i in (0..250).filter(|i| i % 5 < 2) {
        s.handle().delete_pod("default", &format!("many-{i:03}"), Grace::Immediate).expect("delete");
    }
    let left: Vec<String> = {
        let mut v: Vec<String> = (0..250).filter(|i| i % 5 >= 2).map(|i| format!("10.2.{}.{}", i / 200, 10 + i % 200)).collect();
        v.sort();
        v
    };
    eventually("150 endpoints left", || {
        let (slices, lp, left) = (slices.clone(), lp.clone(), left.clone());
        async move {
            let items = slices.list(&lp).await.ok()?.items;
            let mut got: Vec<String> = items.iter().flat_map(|sl| eps(sl).iter().flat_map(|e| e.addresses.clone())).collect();
            got.sort();
            (got == left).then_some(())
        }
    })
    .await;
    assert_eq!(covered(&slices.list(&lp).await.expect("slices").items), left);
}

/// The next event of a watch, within [`WAIT`].
async fn next_event<K>(events: &mut (impl futures::Stream<Item = kube::Result<kube::api::WatchEvent<K>>> + Unpin)) -> kube::api::WatchEvent<K> {
    tokio::time::timeout(WAIT, events.try_next()).await.expect("an event in time").expect("a watch event").expect("not the end")
}

#[tokio::test]
async fn slices_are_written_a_moment_after_the_pod() {
    let s = server().await;
    s.handle().load_manifests(APP).expect("manifests");
    let client = s.client().expect("client");
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let lp = ListParams::default().labels("kubernetes.io/service-name=web");
    slice_when(&slices, &lp, "the Service's slice", |sl| eps(sl).len() == 2).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let from = s.handle().resource_version().to_string();
    let wp = kube::api::WatchParams::default();
    let mut pod_events = pods.watch(&wp, &from).await.expect("pod watch").boxed();
    let mut slice_events = slices.watch(&wp, &from).await.expect("slice watch").boxed();

    let name = pod_name_of(&s, "10.1.0.10");
    let t0 = std::time::Instant::now();
    let pod = s.handle().set_pod_ready("default", &name, false).expect("unready");
    let pod_rv: u64 = pod["metadata"]["resourceVersion"].as_str().and_then(|v| v.parse().ok()).unwrap_or_default();
    // In that instant the slice still says ready: the two disagree for a moment.
    let now = s.handle().list("endpointslices", Some("default"));
    assert!(now[0]["endpoints"].as_array().is_some_and(|e| e.iter().all(|e| e["conditions"]["ready"] == true)), "{now:?}");

    let kube::api::WatchEvent::Modified(p) = next_event(&mut pod_events).await else { panic!("the pod's MODIFIED first") };
    assert_eq!(p.resource_version().and_then(|v| v.parse::<u64>().ok()), Some(pod_rv));
    let kube::api::WatchEvent::Modified(sl) = next_event(&mut slice_events).await else { panic!("then the slice's MODIFIED") };
    let after = t0.elapsed();
    let slice_rv: u64 = sl.resource_version().and_then(|v| v.parse().ok()).unwrap_or_default();
    assert!(slice_rv > pod_rv, "the slice written after the pod, apart: {slice_rv} > {pod_rv}");
    assert!(eps(&sl).iter().any(|e| e.addresses == ["10.1.0.10"] && e.conditions.as_ref().and_then(|c| c.ready) == Some(false)));
    // The delay is 50 ms, on the server's 50 ms timer tick.
    assert!(after >= Duration::from_millis(50), "the slice came {after:?} after the pod");
    assert!(after < Duration::from_millis(1000), "the slice came {after:?} after the pod");
}

#[tokio::test]
async fn the_same_seed_writes_slices_in_the_same_order() {
    async fn writes(seed: u64) -> Vec<(String, String, Vec<String>)> {
        let cfg = Config { seed: Some(seed), ..Config::default() };
        let s = TestApiServer::start(cfg).await.expect("server starts");
        let slices: Api<EndpointSlice> = Api::namespaced(s.client().expect("client"), "default");
        let from = s.handle().resource_version().to_string();
        let mut events = slices.watch(&kube::api::WatchParams::default(), &from).await.expect("watch").boxed();
        s.handle().load_manifests(&many_pods(250)).expect("manifests");
        // Then pods 0..120 go, once the first writes are done.
        tokio::time::sleep(Duration::from_millis(400)).await;
        for i in 0..120 {
            s.handle().delete_pod("default", &format!("many-{i:03}"), Grace::Immediate).expect("delete");
        }
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(800);
        while let Ok(Ok(Some(e))) = tokio::time::timeout_at(deadline, events.try_next()).await {
            let (t, sl) = match e {
                kube::api::WatchEvent::Added(sl) => ("ADDED", sl),
                kube::api::WatchEvent::Modified(sl) => ("MODIFIED", sl),
                kube::api::WatchEvent::Deleted(sl) => ("DELETED", sl),
                _ => continue,
            };
            let mut a: Vec<String> = eps(&sl).iter().flat_map(|e| e.addresses.clone()).collect();
            a.sort();
            out.push((t.to_string(), sl.name_any(), a));
        }
        out
    }
    let (a, b) = tokio::join!(writes(11), writes(11));
    assert!(a.len() >= 4, "{a:?}");
    assert_eq!(a, b, "the same seed: the same slice writes, in the same order");
}

fn eps(sl: &EndpointSlice) -> &[k8s_openapi::api::discovery::v1::Endpoint] {
    sl.endpoints.as_deref().unwrap_or_default()
}

fn pod_name_of(s: &TestApiServer, ip: &str) -> String {
    s.handle()
        .list("pods", Some("default"))
        .into_iter()
        .find(|p| p["status"]["podIP"] == ip && p["metadata"]["deletionTimestamp"].is_null())
        .and_then(|p| p["metadata"]["name"].as_str().map(str::to_string))
        .unwrap_or_default()
}

#[tokio::test]
async fn injected_failures_and_delays_reach_the_client() {
    let s = server().await;
    let api: Api<ConfigMap> = Api::namespaced(s.client().expect("client"), "default");
    let codes = |s: &TestApiServer, verb: &str| {
        s.handle().requests().iter().filter(|r| r.resource == "configmaps" && r.verb == verb).map(|r| r.code).collect::<Vec<_>>()
    };
    // kube's client retries 503 (and 429, 504) itself: the failures show in the record.
    s.handle().fail_next(2, 503);
    api.list(&ListParams::default()).await.expect("retried through 503s");
    assert_eq!(codes(&s, "list"), [503, 503, 200]);
    s.handle().fail_next(1, 500);
    let err = api.list(&ListParams::default()).await.expect_err("500 is not retried");
    assert!(matches!(&err, kube::Error::Api(s) if s.code == 500 && s.reason == "InternalError"), "{err:?}");
    s.handle().add_fail_rule(FailRule { count: 1, code: 429, resource: Some("configmaps".into()), verb: Some("create".into()) });
    api.list(&ListParams::default()).await.expect("other verbs pass");
    let t = std::time::Instant::now();
    api.create(&PostParams::default(), &cm("x", &[])).await.expect("retried after Retry-After");
    assert_eq!(codes(&s, "create"), [429, 201]);
    assert!(t.elapsed() >= Duration::from_millis(900), "Retry-After: 1 honoured");
    s.handle().set_delay(Some(Duration::from_millis(300)));
    let t = std::time::Instant::now();
    api.list(&ListParams::default()).await.expect("slow");
    assert!(t.elapsed() >= Duration::from_millis(300));
    s.handle().set_delay(None);
}

#[derive(Debug, thiserror::Error)]
#[error("reconcile failed")]
struct ReconcileError(#[from] kube::Error);

struct Ctx {
    client: Client,
}

/// A tiny controller in the shape of ipvs-operator's: owns a Service per
/// WeightedService (apply with an owner reference), writes observedGeneration.
async fn reconcile(ws: Arc<WeightedService>, ctx: Arc<Ctx>) -> Result<Action, ReconcileError> {
    let ns = ws.namespace().unwrap_or_default();
    let oref = ws.controller_owner_ref(&()).into_iter().collect();
    let svc = Service {
        metadata: ObjectMeta { name: Some(ws.name_any()), owner_references: Some(oref), ..Default::default() },
        spec: Some(ws.spec.service.clone()),
        ..Default::default()
    };
    let pp = PatchParams::apply("test-controller").force();
    Api::<Service>::namespaced(ctx.client.clone(), &ns).patch(&ws.name_any(), &pp, &Patch::Apply(&svc)).await?;
    let status = json!({"apiVersion": "codesink.net/v1alpha1", "kind": "WeightedService",
        "status": {"observedGeneration": ws.meta().generation, "serviceName": ws.name_any()}});
    Api::<WeightedService>::namespaced(ctx.client.clone(), &ns).patch_status(&ws.name_any(), &pp, &Patch::Apply(&status)).await?;
    Ok(Action::await_change())
}

#[tokio::test]
async fn controller_owns_services_and_garbage_collection_follows() {
    let s = server().await;
    s.handle().load_manifests(APP).expect("manifests");
    let client = s.client().expect("client");
    let wss: Api<WeightedService> = Api::all(client.clone());
    let svcs: Api<Service> = Api::all(client.clone());
    let ctl = Controller::new(wss, watcher::Config::default())
        .owns(svcs, watcher::Config::default())
        .run(reconcile, |_, _, _| Action::requeue(Duration::from_millis(100)), Arc::new(Ctx { client: client.clone() }))
        .for_each(|_| async {});
    let ctl = tokio::spawn(ctl);

    let api: Api<WeightedService> = Api::namespaced(client.clone(), "default");
    let mut ws = WeightedService::new("canary", WeightedServiceSpec::default());
    ws.spec.service.selector = Some(BTreeMap::from([("app".into(), "web".into())]));
    ws.spec.service.ports = Some(vec![ServicePort { port: 80, target_port: Some(IntOrString::String("www".into())), ..Default::default() }]);
    api.create(&PostParams::default(), &ws).await.expect("create ws");
    let status = eventually("status written", || {
        let api = api.clone();
        async move { api.get_status("canary").await.ok()?.status.filter(|s| s.observed_generation == Some(1)) }
    })
    .await;
    assert_eq!(status.service_name.as_deref(), Some("canary"));

    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let lp = ListParams::default().labels("kubernetes.io/service-name=canary");
    let sl = eventually("endpoints for the owned service", || {
        let slices = slices.clone();
        let lp = lp.clone();
        async move { slices.list(&lp).await.ok()?.items.into_iter().find(|s| eps(s).len() == 2) }
    })
    .await;
    assert_eq!(sl.ports.unwrap_or_default()[0].port, Some(8080));

    // A spec change reaches the controller (generation 2).
    api.patch("canary", &PatchParams::default(), &Patch::Merge(json!({"spec": {"scheduler": "wlc"}}))).await.expect("patch");
    eventually("observedGeneration 2", || {
        let api = api.clone();
        async move { (api.get_status("canary").await.ok()?.status?.observed_generation == Some(2)).then_some(()) }
    })
    .await;

    api.delete("canary", &DeleteParams::default()).await.expect("delete ws");
    let services: Api<Service> = Api::namespaced(client, "default");
    assert!(services.get_opt("canary").await.expect("get").is_none(), "owned Service collected");
    assert!(slices.list(&lp).await.expect("slices").items.is_empty(), "its EndpointSlices too");
    ctl.abort();

    let record = s.handle().requests();
    let wanted = [("watch", "weightedservices", ""), ("patch", "services", ""), ("patch", "weightedservices", "status")];
    for (verb, resource, sub) in wanted {
        assert!(
            record.iter().any(|r| r.verb == verb && r.resource == resource && r.subresource == sub),
            "{verb} {resource}/{sub} recorded"
        );
    }
}

#[tokio::test]
async fn events_and_leases() {
    use k8s_openapi::api::coordination::v1::Lease;
    use kube::runtime::events::{Event as KEvent, EventType, Recorder, Reporter};
    let s = server().await;
    let client = s.client().expect("client");
    let reporter = Reporter { controller: "test".into(), instance: Some("t1".into()) };
    let recorder = Recorder::new(client.clone(), reporter);
    let cmap = Api::<ConfigMap>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &cm("subject", &[]))
        .await
        .expect("subject");
    let ev = KEvent { type_: EventType::Warning, reason: "Test".into(), note: Some("hello".into()), action: "Testing".into(), secondary: None };
    recorder.publish(&ev, &cmap.object_ref(&())).await.expect("publish");
    recorder.publish(&ev, &cmap.object_ref(&())).await.expect("publish again (a series)");
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), "default");
    let list = events.list(&ListParams::default()).await.expect("events");
    assert_eq!(list.items.len(), 1, "the repeat became a series");

    let leases: Api<Lease> = Api::namespaced(client, "kube-system");
    let lease = Lease { metadata: ObjectMeta { name: Some("lock".into()), ..Default::default() }, ..Default::default() };
    let l = leases.create(&PostParams::default(), &lease).await.expect("lease");
    let mut renewed = l.clone();
    renewed.spec = Some(k8s_openapi::api::coordination::v1::LeaseSpec { holder_identity: Some("a".into()), ..Default::default() });
    leases.replace("lock", &PostParams::default(), &renewed).await.expect("renew");
    renewed.spec = Some(k8s_openapi::api::coordination::v1::LeaseSpec { holder_identity: Some("b".into()), ..Default::default() });
    let err = leases.replace("lock", &PostParams::default(), &renewed).await.expect_err("stale renew");
    assert!(matches!(&err, kube::Error::Api(s) if s.code == 409), "{err:?}");
}

/// What the controller reads of a pod (host/src/cluster/pods.rs): labels,
/// creation, and the Ready condition's transition time while Ready.
fn pod_meta(pod: &Pod) -> ipvs_operator::snapshot::PodMeta {
    let conditions = pod.status.as_ref().and_then(|s| s.conditions.as_ref());
    let ready = conditions.and_then(|c| c.iter().find(|c| c.type_ == "Ready"));
    ipvs_operator::snapshot::PodMeta {
        labels: Arc::new(pod.labels().clone()),
        created: pod.metadata.creation_timestamp.as_ref().map(|t| t.0),
        ready_since: ready.filter(|c| c.status == "True").and_then(|c| c.last_transition_time.as_ref()).map(|t| t.0),
    }
}

/// PodInfoSlices as ipvs-operator's controller writes them (its own
/// `pod_info`, `plan_slices` and `slice_object`; server-side apply as
/// `ipvs-operator`, forced) and as its agents read them (a watch of the
/// labelled ones): they read back as written, an unchanged apply writes
/// nothing, and deleting the WeightedService collects them.
#[tokio::test]
async fn pod_info_slices_are_applied_watched_and_collected_with_their_weighted_service() {
    use ipvs_operator::crd::PodInfoSlice;
    use ipvs_operator::pod_info::{plan_slices, pod_info, slice_object};

    let s = server().await;
    s.handle().load_manifests(APP).expect("manifests");
    let client = s.client().expect("client");
    let api: Api<WeightedService> = Api::namespaced(client.clone(), "default");
    let mut ws = WeightedService::new("canary", WeightedServiceSpec::default());
    ws.spec.service.selector = Some(BTreeMap::from([("app".into(), "web".into())]));
    let port = ServicePort { port: 80, target_port: Some(IntOrString::String("www".into())), ..Default::default() };
    ws.spec.service.ports = Some(vec![port]);
    let ws = api.create(&PostParams::default(), &ws).await.expect("create ws");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pods = eventually("two Ready pods", || {
        let pods = pods.clone();
        async move {
            let list = pods.list(&ListParams::default().labels("app=web")).await.ok()?.items;
            (list.len() == 2 && list.iter().all(|p| pod_meta(p).ready_since.is_some())).then_some(list)
        }
    })
    .await;
    let infos: Vec<_> = pods.iter().map(|p| pod_info(&p.name_any(), &pod_meta(p))).collect();
    let plan = plan_slices("canary", &[], infos.clone());
    assert_eq!(plan.writes.len(), 1, "{plan:?}");

    // The agent's watch: PodInfoSlices with the owner label, all namespaces.
    let config = watcher::Config::default().labels("codesink.net/weighted-service");
    let mut seen = watcher::watcher(Api::<PodInfoSlice>::all(client.clone()), config).applied_objects().boxed();
    let slices: Api<PodInfoSlice> = Api::namespaced(client.clone(), "default");
    let apply = PatchParams::apply("ipvs-operator").force();
    let (name, published) = plan.writes[0].clone();
    let object = slice_object(&ws, &name, published.clone());
    let written = slices.patch(&name, &apply, &Patch::Apply(&object)).await.expect("the apply creates");
    let pods_of = |s: &PodInfoSlice| s.spec.pods().collect::<Result<Vec<_>, _>>().expect("every label set there");
    assert_eq!(pods_of(&written), published);
    let watched = tokio::time::timeout(WAIT, seen.try_next()).await.expect("the watch delivers");
    let watched = watched.expect("no error").expect("an object");
    assert_eq!((watched.name_any(), pods_of(&watched)), (name.clone(), published.clone()));
    assert_eq!(watched.labels().get("codesink.net/weighted-service").map(String::as_str), Some("canary"));
    let owner = &watched.owner_references()[0];
    let uid = ws.uid().unwrap_or_default();
    assert_eq!((owner.kind.as_str(), owner.uid.as_str(), owner.controller), ("WeightedService", uid.as_str(), Some(true)));
    for pod in &pods {
        let info = published.iter().find(|i| i.name == pod.name_any()).expect("every pod published");
        assert!(info.ready_since.is_some() && info.created.is_some(), "{info:?}");
    }

    // Read back, the slice is what the controller would publish: no write
    // planned; applied again anyway, nothing changes.
    let stored = slices.get(&name).await.expect("the slice");
    assert!(plan_slices("canary", &[(name.clone(), pods_of(&stored))], infos).is_empty(), "{stored:?}");
    let again = slices.patch(&name, &apply, &Patch::Apply(&object)).await.expect("the same apply");
    assert_eq!(again.resource_version(), stored.resource_version());

    // Deleting the WeightedService collects its slices.
    api.delete("canary", &DeleteParams::default()).await.expect("delete ws");
    eventually("the slice collected", || {
        let slices = slices.clone();
        let name = name.clone();
        async move { slices.get_opt(&name).await.ok()?.is_none().then_some(()) }
    })
    .await;
}
