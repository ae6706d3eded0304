//! README.md from the top, as a new user follows it: the install lines, the
//! first WeightedService, troubleshooting's first look, metrics, uninstall —
//! with the real kubectl (`$KUBECTL`, else `target/tools/kubectl` from `make
//! setup`, else `kubectl` on PATH; the test fails without it) and the real
//! controller, against the test API server (a test double: it emulates the
//! cluster's Deployments, DaemonSets, pods and EndpointSlices; no IPVS here, so
//! no agent runs).
//!
//! The commands are the README's own, taken from its `sh` blocks and run as
//! written (no shell: each line is split on whitespace), from the repository's
//! root, with only `KUBECONFIG` (and a fresh `HOME` for kubectl's cache) set.
//! kubectl validates as it does by default (`--validate=strict`: on the
//! server, which the test API server honours). The controller is started as
//! deploy/'s Deployment starts it: its args, its `RUST_LOG`, `POD_NAME` the
//! emulated pod's name, `--policy-dir` a directory holding the policies
//! ConfigMap's files, and `--listen` moved to a free loopback port.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ipvs_operator_tests::apiserver::{Config, Handle, TestApiServer, kubeconfig_yaml};
use ipvs_operator_tests::project_binary;
use serde_json::Value;

const README: &str = include_str!("../../README.md");

/// The pods the README's first WeightedService is for: `app: nginx`, 3
/// `env: prod` and 3 `env: canary`, serving on a container port named `www`.
const PODS: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: nginx-prod}
spec:
  replicas: 3
  selector: {matchLabels: {app: nginx, env: prod}}
  template:
    metadata: {labels: {app: nginx, env: prod}}
    spec:
      containers:
      - name: nginx
        image: nginx:1.27
        ports: [{name: www, containerPort: 8080}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: nginx-canary}
spec:
  replicas: 3
  selector: {matchLabels: {app: nginx, env: canary}}
  template:
    metadata: {labels: {app: nginx, env: canary}}
    spec:
      containers:
      - name: nginx
        image: nginx:1.28
        ports: [{name: www, containerPort: 8080}]
"#;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is in the repository").to_path_buf()
}

/// The shell commands of the `sh` blocks in the README section under
/// `heading`: continuation lines joined, comments dropped.
fn section_commands(heading: &str) -> Vec<String> {
    let start = README.find(&format!("\n{heading}\n")).unwrap_or_else(|| panic!("the README has no {heading:?} section"));
    let section = &README[start + heading.len() + 2..];
    let section = &section[..section.find("\n## ").unwrap_or(section.len())];
    let mut commands = Vec::new();
    let mut block: Option<String> = None;
    for line in section.lines() {
        match (&mut block, line.strip_prefix("```")) {
            (None, Some(lang)) => block = (lang.trim() == "sh").then(String::new).or(Some("\u{0}".into())),
            (Some(body), Some(_)) => {
                if !body.starts_with('\u{0}') {
                    for command in body.replace("\\\n", " ").lines() {
                        let command = command.split(" #").next().unwrap_or_default().trim();
                        if !command.is_empty() && !command.starts_with('#') {
                            commands.push(command.split_whitespace().collect::<Vec<_>>().join(" "));
                        }
                    }
                }
                block = None;
            }
            (Some(body), None) => {
                body.push_str(line);
                body.push('\n');
            }
            (None, None) => {}
        }
    }
    assert!(!commands.is_empty(), "the README's {heading:?} section shows no commands");
    commands
}

/// A user at a terminal in the repository, with a kubeconfig for the server.
struct User {
    kubectl: PathBuf,
    kubeconfig: PathBuf,
    home: PathBuf,
    scratch: PathBuf,
    transcript: std::sync::Mutex<String>,
}

struct Output {
    stdout: String,
    stderr: String,
}

impl User {
    /// Runs one README command line (it must be a kubectl command) and fails
    /// the test unless it succeeds within `timeout`.
    fn run(&self, line: &str, stdin: Option<&str>, timeout: Duration) -> Output {
        let mut words = line.split_whitespace();
        assert_eq!(words.next(), Some("kubectl"), "{line:?} is not a kubectl command");
        let (out_path, err_path) = (self.scratch.join("stdout"), self.scratch.join("stderr"));
        let mut child = Command::new(&self.kubectl)
            .args(words)
            .current_dir(repo())
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HOME", &self.home)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(std::fs::File::create(&out_path).expect("stdout file"))
            .stderr(std::fs::File::create(&err_path).expect("stderr file"))
            .spawn()
            .expect("kubectl starts");
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(input.as_bytes()).expect("kubectl reads stdin");
        }
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = child.try_wait().expect("kubectl runs") {
                break Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let output = Output {
            stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
            stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
        };
        let mut transcript = self.transcript.lock().unwrap_or_else(|p| p.into_inner());
        transcript.push_str(&format!("$ {line}\n{}{}", output.stdout, output.stderr));
        match status {
            Some(s) if s.success() => output,
            Some(s) => panic!("`{line}` failed ({s}):\n{}{}\nso far:\n{transcript}", output.stdout, output.stderr),
            None => panic!("`{line}` did not finish within {timeout:?}:\n{}{}\nso far:\n{transcript}", output.stdout, output.stderr),
        }
    }
}

/// The real controller, started as the Deployment in deploy/ starts it;
/// stopped on drop.
struct Controller {
    child: std::process::Child,
    log: PathBuf,
    listen: SocketAddr,
}

impl Controller {
    fn start(handle: &Handle, kubeconfig: &Path, dir: &Path) -> Self {
        let deployment = handle.get("deployments", "ipvs-operator", "ipvs-operator-controller").expect("the controller's Deployment is installed");
        let container = &deployment["spec"]["template"]["spec"]["containers"][0];
        let args: Vec<String> =
            container["args"].as_array().expect("args").iter().filter_map(Value::as_str).map(str::to_string).collect();
        // README: "the controller's pod port 8080", named `metrics`.
        let listen_arg = args.iter().find_map(|a| a.strip_prefix("--listen=")).expect("the Deployment passes --listen");
        let port_named_metrics = container["ports"].as_array().into_iter().flatten().find(|p| p["name"] == "metrics").expect("a port named metrics");
        assert_eq!(listen_arg.rsplit(':').next(), Some("8080"));
        assert_eq!(port_named_metrics["containerPort"], 8080);
        // The mounted ConfigMap: one file per key.
        let policies = dir.join("policies");
        std::fs::create_dir_all(&policies).expect("a policy directory");
        let cm = handle.get("configmaps", "ipvs-operator", "ipvs-operator-policies").expect("the policies ConfigMap is installed");
        for (key, value) in cm["data"].as_object().into_iter().flatten() {
            std::fs::write(policies.join(key), value.as_str().unwrap_or_default()).expect("a policy file");
        }
        let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let args: Vec<String> = args
            .into_iter()
            .map(|a| {
                if a.starts_with("--listen=") {
                    format!("--listen={listen}")
                } else if a.starts_with("--policy-dir=") {
                    format!("--policy-dir={}", policies.display())
                } else {
                    a
                }
            })
            .collect();
        let pod = handle
            .list("pods", Some("ipvs-operator"))
            .into_iter()
            .find(|p| p["metadata"]["labels"]["app.kubernetes.io/component"] == "controller")
            .expect("the emulated cluster runs the controller's pod");
        let mut command = Command::new(project_binary("ipvs-operator").expect("the operator binary"));
        command.args(&args).env("KUBECONFIG", kubeconfig).env("POD_NAME", pod["metadata"]["name"].as_str().unwrap_or_default());
        for env in container["env"].as_array().into_iter().flatten() {
            if let (Some(name), Some(value)) = (env["name"].as_str(), env["value"].as_str()) {
                command.env(name, value);
            }
        }
        let log = dir.join("controller.log");
        let child = command
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("a log file"))
            .spawn()
            .expect("ipvs-operator controller starts");
        Controller { child, log, listen }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// `GET path` over plain HTTP/1.1: status, headers (lowercased names) and body.
fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, head.to_ascii_lowercase(), body.to_string()))
}

/// Polls `done` every 100 ms for up to `secs`.
async fn wait_for(what: &str, secs: u64, mut done: impl FnMut() -> bool, log: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}; controller log:\n{}", log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn condition<'a>(ws: &'a Value, type_: &str) -> Option<&'a Value> {
    ws["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == type_)
}

/// The rows of kubectl's table output as words, header first.
fn rows(table: &str) -> Vec<Vec<String>> {
    table.lines().map(|l| l.split_whitespace().map(str::to_string).collect()).filter(|r: &Vec<String>| !r.is_empty()).collect()
}

/// A user with a fresh HOME (kubectl's cache) in a temporary directory.
fn user(kubectl: PathBuf, url: &str, dir: &Path) -> User {
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, kubeconfig_yaml(url)).expect("the kubeconfig is written");
    let home = dir.join("home");
    let scratch = dir.join("scratch");
    for d in [&home, &scratch] {
        std::fs::create_dir_all(d).expect("a directory");
    }
    User { kubectl, kubeconfig, home, scratch, transcript: std::sync::Mutex::new(String::new()) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_user_follows_the_readme() {
    let kubectl = ipvs_operator_tests::kubectl::path();
    // A namespace lingers while its content is deleted, as on a real cluster
    // (`kubectl delete -k deploy/` deletes the namespace first, then what is in it).
    // No CRD at start: the user installs it with deploy/.
    let config = Config { namespace_cleanup: Duration::from_secs(1), crds: Vec::new(), ..Config::default() };
    let server = TestApiServer::start(config).await.expect("the test API server starts");
    let handle = server.handle().clone();
    let dir = std::env::temp_dir().join(format!("ipvs-operator-walkthrough-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let user = std::sync::Arc::new(user(kubectl, server.url(), &dir));
    let minute = Duration::from_secs(60);
    let kubectl = |line: String, stdin: Option<&'static str>| {
        let user = user.clone();
        async move { tokio::task::spawn_blocking(move || user.run(&line, stdin, minute)).await.expect("kubectl thread") }
    };

    // ## Install: the three lines, as written.
    let install = section_commands("## Install");
    assert_eq!(install[0], "kubectl apply -k deploy/", "the install line");
    let mut outputs = Vec::new();
    for line in &install {
        outputs.push(kubectl(line.clone(), None).await);
    }
    let applied = &outputs[0].stdout;
    for object in [
        "namespace/ipvs-operator created",
        "customresourcedefinition.apiextensions.k8s.io/weightedservices.codesink.net created",
        "customresourcedefinition.apiextensions.k8s.io/podinfoslices.codesink.net created",
        "resourcequota/ipvs-operator-critical-pods created",
        "configmap/ipvs-operator-policies created",
        "deployment.apps/ipvs-operator-controller created",
        "daemonset.apps/ipvs-operator-agent created",
        "poddisruptionbudget.policy/ipvs-operator-controller created",
        "role.rbac.authorization.k8s.io/ipvs-operator-controller-leader created",
    ] {
        assert!(applied.contains(object), "`kubectl apply -k deploy/` printed:\n{applied}");
    }
    assert!(!outputs[0].stderr.contains("Warning"), "deploy/ has fields the API does not know:\n{}", outputs[0].stderr);
    let validated: Vec<_> = handle.requests().into_iter().filter(|r| r.verb == "create" && r.user_agent.starts_with("kubectl")).collect();
    assert!(validated.len() >= 14, "kubectl created every object of deploy/: {validated:?}");
    for line in &install[1..] {
        assert!(line.contains("rollout status"), "{line}");
    }
    assert!(outputs[1].stdout.contains("successfully rolled out"), "{}", outputs[1].stdout);
    assert!(outputs[2].stdout.contains("successfully rolled out"), "{}", outputs[2].stdout);

    // The controller's pod runs the real binary (the agent needs IPVS, which this host lacks).
    let controller = Controller::start(&handle, &user.kubeconfig, &dir);
    let log = || controller.log();

    // The user's pods, then ## Your first WeightedService, line by line.
    kubectl("kubectl apply -f -".into(), Some(PODS)).await;
    wait_for(
        "6 ready nginx pods",
        30,
        || {
            handle
                .list("pods", Some("default"))
                .iter()
                .filter(|p| p["metadata"]["labels"]["app"] == "nginx")
                .filter(|p| p["status"]["conditions"].as_array().is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True")))
                .count()
                == 6
        },
        &log,
    )
    .await;
    let first = section_commands("## Your first WeightedService");
    assert_eq!(first[0], "kubectl apply -f examples/seed-canary.yaml");
    let created = kubectl(first[0].clone(), None).await;
    assert_eq!(created.stdout.trim(), "weightedservice.codesink.net/example created");
    // A moment for the controller: its status, and its Event.
    wait_for(
        "the WeightedService's Ready condition and the controller's Event",
        30,
        || {
            let ready = handle.get("weightedservices", "default", "example").is_some_and(|ws| condition(&ws, "Ready").is_some_and(|c| c["status"] == "True"));
            ready && handle.list("events", Some("default")).iter().any(|e| e["reason"] == "Evaluated")
        },
        &log,
    )
    .await;
    let mut shown = std::collections::BTreeMap::new();
    for line in &first[1..] {
        shown.insert(line.clone(), kubectl(line.clone(), None).await.stdout);
    }

    // `kubectl get weightedservices   # SERVICE, POLICY, READY, AGE`
    let table = rows(&shown["kubectl get weightedservices"]);
    assert_eq!(table[0], ["NAME", "SERVICE", "POLICY", "READY", "AGE"], "{table:?}");
    assert_eq!(table[1][..4], ["example", "example", "label-selector", "True"], "{table:?}");

    // `kubectl get service example   # the Service it made`
    let ws = handle.get("weightedservices", "default", "example").expect("the WeightedService");
    let service = handle.get("services", "default", "example").expect("the Service it made");
    let cluster_ip = service["spec"]["clusterIP"].as_str().expect("a ClusterIP");
    let table = rows(&shown["kubectl get service example"]);
    assert_eq!(table[0], ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"], "{table:?}");
    assert_eq!(table[1][..5], ["example", "ClusterIP", cluster_ip, "<none>", "80/TCP"], "{table:?}");
    assert_eq!(service["metadata"]["ownerReferences"][0]["uid"], ws["metadata"]["uid"], "owned by the WeightedService");
    // ServiceReady's message has its ClusterIP (README, Conditions).
    let service_ready = condition(&ws, "ServiceReady").expect("ServiceReady");
    assert_eq!((service_ready["status"].as_str(), service_ready["reason"].as_str()), (Some("True"), Some("Applied")));
    assert!(service_ready["message"].as_str().is_some_and(|m| m.contains(cluster_ip)), "{service_ready}");

    // `kubectl describe weightedservice example`: conditions and groups.
    let described = &shown["kubectl describe weightedservice example"];
    for expected in ["Conditions:", "Type: PolicyReady", "Type: ServiceReady", "Type: Ready", "Groups:", "Weight: 10", "Weight: 1", "Endpoints: 3", "Share: 0.9091", "Share: 0.0909", "Name: label-selector"] {
        let squeezed: String = described.lines().map(|l| l.split_whitespace().collect::<Vec<_>>().join(" ")).collect::<Vec<_>>().join("\n");
        assert!(squeezed.contains(expected), "describe lacks {expected:?}:\n{described}");
    }
    assert!(
        described.lines().any(|l| l.contains("Normal") && l.contains("Evaluated") && l.contains("ipvs-operator")),
        "describe shows the controller's Event:\n{described}"
    );
    // "prod receives 30/33 (90.9 %) of new connections, canary 3/33 (9.1 %)".
    let groups = ws["status"]["groups"].as_array().expect("groups");
    let shares: Vec<f64> = groups.iter().filter_map(|g| g["share"].as_f64()).collect();
    assert_eq!(shares.len(), 2, "{groups:?}");
    assert!((shares[0] - 30.0 / 33.0).abs() < 1e-3 && (shares[1] - 3.0 / 33.0).abs() < 1e-3, "{shares:?}");

    // "`kubectl get weightedservice example -o yaml` shows it all" (the Status table).
    let yaml = kubectl("kubectl get weightedservice example -o yaml".into(), None).await.stdout;
    let full: Value = serde_saphyr::from_str(&yaml).expect("YAML");
    let status = &full["status"];
    assert_eq!(status["observedGeneration"], full["metadata"]["generation"]);
    assert_eq!(status["serviceName"], "example");
    assert_eq!(status["policy"]["name"], "label-selector");
    assert!(status["policy"]["sha256"].as_str().is_some_and(|h| h.len() == 64), "{status}");
    for c in ["PolicyReady", "ServiceReady", "Ready"] {
        let c = condition(&full, c).unwrap_or_else(|| panic!("{c} in {status}"));
        assert!(c["reason"].is_string() && c["message"].is_string(), "{c}");
    }
    for g in groups {
        for field in ["selector", "weight", "endpoints", "share"] {
            assert!(!g[field].is_null(), "a group without {field}: {g}");
        }
    }

    // ## Troubleshooting: the first look, with NAME = example.
    for line in section_commands("## Troubleshooting").iter().filter(|l| !l.contains("POD") && !l.contains("exec")).take(3) {
        let line = line.replace("NAME", "example");
        let out = kubectl(line.clone(), None).await.stdout;
        if line == "kubectl get weightedservices -A" {
            let table = rows(&out);
            assert_eq!(table[0], ["NAMESPACE", "NAME", "SERVICE", "POLICY", "READY", "AGE"], "{out}");
            assert_eq!(table[1][..5], ["default", "example", "example", "label-selector", "True"], "{out}");
        } else if line.starts_with("kubectl events") {
            assert!(out.contains("Evaluated") && out.contains("WeightedService/example"), "`{line}`:\n{out}");
        } else {
            assert!(out.contains("Conditions:"), "`{line}`:\n{out}");
        }
    }

    // ## Metrics: OpenMetrics text on the --listen address, and health.
    let (code, head, metrics) = http_get(controller.listen, "/metrics").expect("/metrics answers");
    assert_eq!(code, 200);
    assert!(head.contains("content-type: application/openmetrics-text"), "{head}");
    let evaluations: f64 = metrics
        .lines()
        .find(|l| l.starts_with(r#"ipvs_operator_policy_evaluations_total{policy="label-selector",result="ok"}"#))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no ok evaluations of label-selector:\n{metrics}"));
    assert!(evaluations >= 1.0, "{metrics}");
    for family in ["ipvs_operator_policy_evaluation_seconds", "ipvs_operator_reconcile_seconds", "ipvs_operator_watched_objects"] {
        assert!(metrics.contains(&format!("# TYPE {family} ")), "{family} missing:\n{metrics}");
    }
    assert_eq!(http_get(controller.listen, "/healthz").map(|r| r.0), Some(200));

    // ## Uninstall: the CRD goes, hence the WeightedService, hence its Service.
    let uninstall = section_commands("## Uninstall");
    assert_eq!(uninstall[0], "kubectl delete -k deploy/");
    kubectl(uninstall[0].clone(), None).await;
    assert!(handle.get("weightedservices", "default", "example").is_none(), "the WeightedService went with the CRD");
    assert!(handle.get("services", "default", "example").is_none(), "the Service went with its WeightedService");
    assert!(handle.get("namespaces", "", "ipvs-operator").is_none(), "the namespace went");

    eprintln!("{}", user.transcript.lock().unwrap_or_else(|p| p.into_inner()));
    drop(controller);
    let _ = std::fs::remove_dir_all(&dir);
}

/// README, Metrics: "`/readyz` (the controller has its caches…)"; deploy/'s
/// controller Deployment probes it, so `kubectl rollout status` on a real
/// cluster waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_reports_ready_once_its_caches_are_synced() {
    let server = TestApiServer::start(Config::default()).await.expect("the test API server starts");
    let handle = server.handle().clone();
    let kubectl = ipvs_operator_tests::kubectl::path();
    let rendered = Command::new(&kubectl).arg("kustomize").arg(repo().join("deploy")).output().expect("kubectl runs");
    assert!(rendered.status.success(), "kubectl kustomize deploy/ failed:\n{}", String::from_utf8_lossy(&rendered.stderr));
    handle.load_manifests(&String::from_utf8_lossy(&rendered.stdout)).expect("deploy/ loads");
    handle.load_manifests(PODS).expect("the pods load");
    handle.load_file(&repo().join("examples/seed-canary.yaml")).expect("the WeightedService loads");
    let dir = std::env::temp_dir().join(format!("ipvs-operator-walkthrough-ready-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, kubeconfig_yaml(server.url())).expect("the kubeconfig is written");
    let controller = Controller::start(&handle, &kubeconfig, &dir);
    wait_for(
        "/readyz to answer 200",
        20,
        || http_get(controller.listen, "/readyz").is_some_and(|r| r.0 == 200),
        || controller.log(),
    )
    .await;
    drop(controller);
    let _ = std::fs::remove_dir_all(&dir);
}
