//! Faithfulness of the test API server to a client nobody here wrote: kubectl
//! (`$KUBECTL`, else `target/tools/kubectl` from `make setup`, else `kubectl` on
//! PATH; the test fails without one) pointed at it with `--server`.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use ipvs_operator_tests::apiserver::{Config, TestApiServer};

struct Kubectl {
    bin: PathBuf,
    server: String,
    cache: PathBuf,
}

impl Kubectl {
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--server").arg(&self.server).arg("--cache-dir").arg(&self.cache).args(args);
        // No user kubeconfig may leak in (credentials, another namespace).
        c.env("KUBECONFIG", self.cache.join("none"));
        c
    }

    fn run(&self, args: &[&str], stdin: Option<&str>) -> String {
        let mut c = self.command(args);
        c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = c.spawn().expect("kubectl starts");
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            use std::io::Write as _;
            pipe.write_all(input.as_bytes()).expect("write stdin");
        }
        let out = child.wait_with_output().expect("kubectl runs");
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "kubectl {args:?} failed: {}{stdout}", String::from_utf8_lossy(&out.stderr));
        stdout
    }
}

const MANIFEST: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: web
        image: nginx
        ports: [{name: www, containerPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: www}]
---
apiVersion: codesink.net/v1alpha1
kind: WeightedService
metadata: {name: example}
spec:
  selector: {app: web}
  ports: [{protocol: TCP, port: 80, targetPort: www}]
  weights:
  - {weight: 10, selector: {env: prod}}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_get_apply_delete_and_watch() {
    let bin = ipvs_operator_tests::kubectl::path();
    let server = TestApiServer::start(Config::default()).await.expect("server");
    let cache = std::env::temp_dir().join(format!("ipvs-operator-kubectl-{}-{}", std::process::id(), server.addr().port()));
    let k = Kubectl { bin, server: server.url().to_string(), cache: cache.clone() };
    let h = server.handle().clone();

    let out = tokio::task::spawn_blocking({
        let k = Kubectl { bin: k.bin.clone(), server: k.server.clone(), cache: k.cache.clone() };
        move || {
            let mut log = String::new();
            log += &k.run(&["apply", "--validate=false", "-f", "-"], Some(MANIFEST));
            log += &k.run(&["get", "pods", "-o", "name"], None);
            // Client-side apply of a changed manifest: a strategic merge patch
            // with $setElementOrder for the built-in kinds, a merge patch for the CRD.
            let changed = MANIFEST
                .replace("replicas: 2", "replicas: 3")
                .replace("port: 80, targetPort: www}]\n---\napiVersion: codesink", "port: 80, targetPort: www}, {name: https, port: 443, targetPort: 8443}]\n---\napiVersion: codesink")
                .replace("weight: 10", "weight: 20");
            log += &k.run(&["apply", "--validate=false", "-f", "-"], Some(&changed));
            log += &k.run(&["get", "weightedservices", "example", "-o", "jsonpath={.spec.weights[0].weight}"], None);
            log
        }
    })
    .await
    .expect("kubectl thread");
    assert_eq!(out.matches("created").count(), 3, "{out}");
    assert_eq!(out.matches("pod/web-").count(), 2, "{out}");
    assert!(out.contains("deployment.apps/web configured"), "{out}");
    assert!(out.contains("service/web configured"), "{out}");
    assert!(out.ends_with("20"), "{out}");

    let svc = h.get("services", "default", "web").expect("service");
    let ports: Vec<i64> = svc["spec"]["ports"].as_array().into_iter().flatten().filter_map(|p| p["port"].as_i64()).collect();
    assert_eq!(ports, [80, 443], "strategic merge by port");
    assert!(svc["spec"]["clusterIP"].as_str().is_some_and(|ip| ip.starts_with("10.")));
    assert_eq!(h.get("deployments", "default", "web").expect("deployment")["spec"]["replicas"], 3);
    assert_eq!(h.list("pods", Some("default")).len(), 3);

    // get --watch sees a deletion made by another kubectl; delete waits for the pod to go.
    let mut watch = k.command(&["get", "pods", "--watch", "-o", "name"]).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("watch");
    // Wait until kubectl's watch is open (it lists first, then watches).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !h.requests().iter().any(|r| r.verb == "watch" && r.resource == "pods") {
        assert!(std::time::Instant::now() < deadline, "kubectl get --watch never watched");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let victim = h.list("pods", Some("default"))[0]["metadata"]["name"].as_str().unwrap_or_default().to_string();
    let out = tokio::task::spawn_blocking({
        let k = Kubectl { bin: k.bin.clone(), server: k.server.clone(), cache: k.cache.clone() };
        let victim = victim.clone();
        move || {
            let mut log = k.run(&["delete", "pod", &victim], None);
            log += &k.run(&["delete", "-f", "-"], Some(MANIFEST));
            log
        }
    })
    .await
    .expect("kubectl thread");
    assert!(out.contains(&format!("pod \"{victim}\" deleted")), "{out}");
    assert!(out.contains("weightedservice.codesink.net \"example\" deleted"), "{out}");
    assert!(h.get("pods", "default", &victim).is_none(), "kubectl delete waited for the pod to go");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = watch.kill();
    let watched = tokio::task::spawn_blocking(move || watch.wait_with_output()).await.expect("join").expect("watch output");
    let watched = String::from_utf8_lossy(&watched.stdout).to_string();
    assert!(watched.matches(&format!("pod/{victim}")).count() >= 2, "listed, then its changes: {watched}");
    assert!(h.get("services", "default", "web").is_none());
    assert!(h.list("endpointslices", Some("default")).is_empty(), "slices collected with their Service");

    let verbs: Vec<String> = h.requests().iter().filter(|r| r.resource == "services").map(|r| r.verb.clone()).collect();
    for v in ["get", "create", "patch", "delete"] {
        assert!(verbs.iter().any(|x| x == v), "kubectl's {v} on services recorded: {verbs:?}");
    }
    let _ = std::fs::remove_dir_all(cache);
}

/// The PodInfoSlice kind as kubectl finds it: discovery, and its CRD's
/// printer columns (the WeightedService column's path escapes the dot of the
/// label key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_lists_pod_info_slices_with_their_printer_columns() {
    let bin = ipvs_operator_tests::kubectl::path();
    let server = TestApiServer::start(Config::default()).await.expect("server");
    let cache = std::env::temp_dir().join(format!("ipvs-operator-kubectl-{}-{}", std::process::id(), server.addr().port()));
    let k = Kubectl { bin, server: server.url().to_string(), cache: cache.clone() };
    server
        .handle()
        .load_manifests(
            "apiVersion: codesink.net/v1alpha1\nkind: PodInfoSlice\n\
             metadata: {name: web-0, namespace: default, labels: {codesink.net/weighted-service: web}}\n\
             spec: {pods: [{name: web-a, labels: {env: prod}, created: '2026-01-01T00:00:00Z'}]}\n",
        )
        .expect("a PodInfoSlice");
    let (table, pod) = tokio::task::spawn_blocking(move || {
        let pod = k.run(&["get", "podinfoslice", "web-0", "-o", "jsonpath={.spec.pods[0].name}"], None);
        (k.run(&["get", "podinfoslices"], None), pod)
    })
    .await
    .expect("kubectl thread");
    let rows: Vec<Vec<&str>> = table.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows[0], ["NAME", "WEIGHTEDSERVICE", "AGE"], "{table}");
    assert_eq!(rows[1][..2], ["web-0", "web"], "{table}");
    assert_eq!(pod, "web-a");
    let _ = std::fs::remove_dir_all(&cache);
}
