//! What the agents cost the API server (issue 19): the real controller and
//! three agents (node-1..3) against the test API server (a test double) with
//! `APILOAD_SERVICES` WeightedServices (default 1,000) of 10 pods each and
//! `APILOAD_OTHER_PODS` pods no WeightedService selects (default 40,000),
//! whose pods are then churned: for `APILOAD_PHASE_SECONDS` (default 30) only
//! the pods no WeightedService selects (the irrelevant churn), then as long
//! only those behind WeightedServices (the relevant churn). Each second: 100
//! status updates (half flip a pod's Ready condition, half restart its
//! container, which changes neither readiness nor labels), 10 label changes,
//! 2 pod deletions (their Deployments create replacements: 2 creates). Where the
//! test API server cannot keep that pace (its built-in controllers), the
//! phase runs longer and its rates are per second of the phase as it ran.
//!
//! The server logs what it sends each client by User-Agent (an agent's names
//! its node) and resource: requests, response bytes, watch events and watch
//! bytes. The baseline, in the same run: a bare cluster-wide pod metadata
//! watch that the bench opens itself — what every agent paid before it
//! stopped watching pods. After the churn, the server's watches are cut and
//! their resourceVersions expired, as after an API server restart: every
//! client relists, and what that costs is recorded too.
//!
//! Writes `target/bench/apiload.json`: per agent and for the baseline, per
//! phase and per resource: watch events and bytes per second, requests per
//! second; the relist's bytes and objects; and `irrelevantBytesRatio`, the
//! agents' bytes during the irrelevant churn over the baseline's (goal: under
//! 1 %). `ours` is the agents' mean bytes per second during the relevant
//! churn, `baseline` the baseline watch's.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::StreamExt;
use ipvs_operator_tests::apiserver::traffic::{Traffic, TrafficLog, of_client};
use ipvs_operator_tests::apiserver::{Config, Grace, Handle, NodeConfig, PodUpdate, TestApiServer, kubeconfig_yaml};
use ipvs_operator_tests::apiserver::Cidr;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PartialObjectMeta};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::{Value, json};

mod process;
use process::{Process, env_number, sample};

const NODES: [&str; 3] = ["node-1", "node-2", "node-3"];
/// The baseline watch's User-Agent.
const BASELINE: &str = "apiload-baseline/pod-metadata";
/// Pods of each WeightedService.
const REPLICAS: usize = 10;
/// Background pods per Deployment (and namespace).
const OTHER_PER_NAMESPACE: usize = 200;
/// Churn per second.
const STATUS_UPDATES: usize = 100;
const LABEL_CHANGES: usize = 10;
const DELETIONS: usize = 2;
/// The goal: irrelevant churn costs an agent under this share of the bytes it costs the baseline.
const IRRELEVANT_GOAL: f64 = 0.01;


/// The cluster: a Deployment and a WeightedService per service, 20 to a
/// namespace; the background pods in namespaces of their own.
fn cluster(services: usize, other_pods: usize) -> String {
    let mut yaml = String::new();
    for i in 0..services {
        yaml.push_str(&format!(
            r#"---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web-{i}, namespace: shop-{ns}}}
spec:
  replicas: {REPLICAS}
  selector: {{matchLabels: {{app: web-{i}}}}}
  template:
    metadata: {{labels: {{app: web-{i}, env: prod, team: shop}}}}
    spec: {{containers: [{{name: web, image: web, ports: [{{containerPort: 8080, name: www}}]}}]}}
---
apiVersion: codesink.net/v1alpha1
kind: WeightedService
metadata: {{name: web-{i}, namespace: shop-{ns}}}
spec:
  selector: {{app: web-{i}}}
  ports: [{{protocol: TCP, port: 80, targetPort: www}}]
  weights: [{{weight: 10, selector: {{env: prod}}}}]
"#,
            ns = i / 20
        ));
    }
    for n in 0..other_pods.div_ceil(OTHER_PER_NAMESPACE) {
        let replicas = OTHER_PER_NAMESPACE.min(other_pods - n * OTHER_PER_NAMESPACE);
        yaml.push_str(&format!(
            r#"---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: batch, namespace: other-{n}}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: batch}}}}
  template:
    metadata: {{labels: {{app: batch, team: other}}}}
    spec: {{containers: [{{name: job, image: job}}]}}
"#
        ));
    }
    yaml
}

/// (namespace, name) of every pod in namespaces starting with `prefix`.
fn pods_in(h: &Handle, prefix: &str) -> Vec<(String, String)> {
    h.list("pods", None)
        .iter()
        .filter_map(|p| {
            let ns = p["metadata"]["namespace"].as_str()?;
            let name = p["metadata"]["name"].as_str()?;
            ns.starts_with(prefix).then(|| (ns.to_string(), name.to_string()))
        })
        .collect()
}

/// A tiny deterministic generator (the churn is the same from run to run).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 33) as usize) % n.max(1)
    }
}

/// Churn the pods of namespaces starting with `prefix` for `seconds`.
fn churn(h: &Handle, prefix: &str, seconds: u64, rng: &mut Lcg) -> Result<()> {
    let started = Instant::now();
    let mut revision = 0u64;
    let mut pods = Vec::new();
    for second in 0..seconds {
        // Listed again now and then: deleted pods are replaced under new names.
        if second % 5 == 0 {
            pods = pods_in(h, prefix);
        }
        anyhow::ensure!(!pods.is_empty(), "no pods in {prefix}*");
        for i in 0..STATUS_UPDATES {
            let (ns, name) = &pods[rng.below(pods.len())];
            let update = if i % 2 == 0 {
                // A Ready flip: ready again when it is picked next.
                let pod = h.get("pods", ns, name);
                let ready = pod.as_ref().and_then(|p| p["status"]["conditions"].as_array().cloned()).is_some_and(|cs| {
                    cs.iter().any(|c| c["type"] == "Ready" && c["status"] == "True")
                });
                PodUpdate { ready: Some(!ready), ..Default::default() }
            } else {
                // A container restart: a status write that changes neither readiness nor labels.
                PodUpdate { restarted: true, ..Default::default() }
            };
            let _ = h.update_pod(ns, name, &update);
        }
        for _ in 0..LABEL_CHANGES {
            let (ns, name) = &pods[rng.below(pods.len())];
            revision += 1;
            let _ = h.set_pod_label(ns, name, "revision", Some(&revision.to_string()));
        }
        for _ in 0..DELETIONS {
            let (ns, name) = &pods[rng.below(pods.len())];
            let _ = h.delete_pod(ns, name, Grace::Immediate);
        }
        let due = Duration::from_secs(second + 1);
        if let Some(rest) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    Ok(())
}

/// A client's figures for one phase: per resource, and in all.
fn figures(traffic: &BTreeMap<String, Traffic>, seconds: f64) -> Value {
    let per = |t: &Traffic| {
        json!({
            "watchEventsPerSecond": round(t.watch_events as f64 / seconds),
            "watchBytesPerSecond": round(t.watch_bytes as f64 / seconds),
            "requestsPerSecond": round(t.requests as f64 / seconds),
            "responseBytesPerSecond": round(t.response_bytes as f64 / seconds),
        })
    };
    let total = traffic.values().fold(Traffic::default(), |a, t| a.plus(t));
    json!({
        "byResource": traffic.iter().map(|(r, t)| (r.clone(), per(t))).collect::<BTreeMap<_, _>>(),
        "total": per(&total),
        "bytesPerSecond": round(total.bytes() as f64 / seconds),
    })
}

/// A client's relist: bytes and objects listed, per resource.
fn relist(traffic: &BTreeMap<String, Traffic>) -> Value {
    let total = traffic.values().fold(Traffic::default(), |a, t| a.plus(t));
    json!({
        "byResource": traffic.iter().map(|(r, t)| (r.clone(), json!({"bytes": t.bytes(), "objects": t.list_items + t.watch_events, "requests": t.requests}))).collect::<BTreeMap<_, _>>(),
        "bytes": total.bytes(),
        "objects": total.list_items + total.watch_events,
        "requests": total.requests,
    })
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn agent_user_agent(node: &str) -> String {
    format!("ipvs-operator-agent/{} ({node})", env!("CARGO_PKG_VERSION"))
}

/// The bytes per second of every client in `log` matching `user_agent`.
fn bytes_per_second(log: &TrafficLog, user_agent: &str, seconds: f64) -> f64 {
    of_client(log, user_agent).values().map(Traffic::bytes).sum::<u64>() as f64 / seconds
}

fn main() -> Result<()> {
    let services = env_number("APILOAD_SERVICES", 1000)?;
    let other_pods = env_number("APILOAD_OTHER_PODS", 40_000)?;
    let phase = env_number("APILOAD_PHASE_SECONDS", 30)? as u64;
    let selected = services * REPLICAS;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let config = Config {
        // 50,000 pods and the churn's replacements: a /12 of pod addresses.
        pod_cidr: Cidr { base: u32::from(std::net::Ipv4Addr::new(10, 128, 0, 0)), prefix: 12 },
        pod_cidr_v6: None,
        nodes: NODES
            .iter()
            .enumerate()
            .map(|(i, n)| NodeConfig::new(*n, std::net::IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, i as u8 + 1))))
            .collect(),
        max_events: 200_000,
        bookmark_interval: Duration::from_secs(60),
        ..Config::default()
    };
    let server = runtime.block_on(TestApiServer::start(config))?;
    let h = server.handle().clone();
    let loading = Instant::now();
    h.load_manifests(&cluster(services, other_pods))?;
    eprintln!("loaded {selected} selected and {other_pods} other pods in {:.1} s", loading.elapsed().as_secs_f64());

    let dir = std::env::temp_dir().join(format!("ipvs-operator-apiload-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, kubeconfig_yaml(server.url()))?;
    let controller = Process::start(&["controller"], &kubeconfig, &dir.join("controller.log"))?;
    let agents: Vec<Process> = NODES
        .iter()
        .map(|n| Process::start(&["agent", "--node-name", n], &kubeconfig, &dir.join(format!("agent-{n}.log"))))
        .collect::<Result<_>>()?;
    let pods = (selected + other_pods) as f64;
    controller.wait_for("the controller caching every pod", Duration::from_secs(600), |page| {
        sample(page, "ipvs_operator_watched_objects{kind=\"Pod\"}") == Some(pods)
    })?;
    let slices = (services * REPLICAS.div_ceil(ipvs_operator::crd::PODS_PER_SLICE)) as f64;
    for agent in &agents {
        agent.wait_for("an agent caching every PodInfoSlice", Duration::from_secs(600), |page| {
            sample(page, "ipvs_operator_watched_objects{kind=\"PodInfoSlice\"}") == Some(slices)
        })?;
    }
    eprintln!("controller and agents synced in {:.1} s", loading.elapsed().as_secs_f64());

    // The baseline: what each agent paid before, a cluster-wide pod metadata watch.
    let baseline_client = {
        let _in_runtime = runtime.enter();
        ipvs_operator_tests::apiserver::client_with_user_agent(server.url(), Some(BASELINE))?
    };
    let (listed_tx, listed_rx) = std::sync::mpsc::channel();
    let baseline = runtime.spawn(async move {
        let api: Api<PartialObjectMeta<Pod>> = Api::all(baseline_client);
        let mut events = std::pin::pin!(watcher(api, watcher::Config::default()).default_backoff());
        while let Some(event) = events.next().await {
            if matches!(event, Ok(watcher::Event::InitDone)) {
                let _ = listed_tx.send(());
            }
        }
    });
    listed_rx.recv_timeout(Duration::from_secs(300)).context("the baseline watch's first list")?;
    std::thread::sleep(Duration::from_secs(10)); // the controller's first reconciles settle

    let mut rng = Lcg(19);
    let mut phases = BTreeMap::new();
    let mut ratios = Vec::new();
    for (name, prefix) in [("irrelevant", "other-"), ("relevant", "shop-")] {
        h.reset_traffic();
        let started = Instant::now();
        churn(&h, prefix, phase, &mut rng)?;
        std::thread::sleep(Duration::from_secs(2)); // the last events reach the watches
        let log = h.traffic();
        // The churn runs late when the test API server cannot keep up: rates are per second of the phase as it was.
        let seconds = started.elapsed().as_secs_f64();
        if seconds > phase as f64 + 4.0 {
            eprintln!("{name} churn: the test API server took {seconds:.0} s for {phase} s of churn: rates are lower");
        }
        let mut clients = BTreeMap::new();
        for node in NODES {
            clients.insert(node.to_string(), figures(&of_client(&log, &agent_user_agent(node)), seconds));
        }
        clients.insert("baseline".into(), figures(&of_client(&log, BASELINE), seconds));
        let baseline_bytes = bytes_per_second(&log, BASELINE, seconds);
        let agent_bytes: f64 = NODES.iter().map(|n| bytes_per_second(&log, &agent_user_agent(n), seconds)).sum::<f64>() / 3.0;
        eprintln!(
            "{name} churn: an agent receives {agent_bytes:.0} B/s, the baseline pod metadata watch {baseline_bytes:.0} B/s"
        );
        if name == "irrelevant" {
            ratios.push(agent_bytes / baseline_bytes.max(1.0));
        }
        clients.insert("seconds".into(), json!(round(seconds)));
        clients.insert("agentMeanBytesPerSecond".into(), json!(round(agent_bytes)));
        clients.insert("baselineBytesPerSecond".into(), json!(round(baseline_bytes)));
        phases.insert(name, clients);
    }

    // An API server restart: every watch cut, every resourceVersion too old.
    h.reset_traffic();
    let lists_before: Vec<f64> = agents
        .iter()
        .map(|a| sample(&a.metrics(), "ipvs_operator_watch_lists_total{kind=\"PodInfoSlice\"}").unwrap_or(0.0))
        .collect();
    h.expire_resource_versions();
    h.close_watches();
    for (agent, before) in agents.iter().zip(&lists_before) {
        agent.wait_for("an agent relisting", Duration::from_secs(120), |page| {
            sample(page, "ipvs_operator_watch_lists_total{kind=\"PodInfoSlice\"}").is_some_and(|n| n > *before)
        })?;
    }
    std::thread::sleep(Duration::from_secs(5));
    let log = h.traffic();
    let mut relists = BTreeMap::new();
    for node in NODES {
        relists.insert(node.to_string(), relist(&of_client(&log, &agent_user_agent(node))));
    }
    relists.insert("baseline".to_string(), relist(&of_client(&log, BASELINE)));
    baseline.abort();

    let irrelevant_ratio = ratios.first().copied().unwrap_or(f64::NAN);
    let relevant = &phases["relevant"];
    let report = json!({
        "services": services,
        "selectedPods": selected,
        "otherPods": other_pods,
        "agents": NODES.len(),
        "phaseSeconds": phase,
        "churnPerSecond": {"statusUpdates": STATUS_UPDATES, "readyFlips": STATUS_UPDATES / 2, "containerRestarts": STATUS_UPDATES / 2, "labelChanges": LABEL_CHANGES, "deletions": DELETIONS, "creates": DELETIONS},
        "phases": phases,
        "relist": relists,
        "irrelevantBytesRatio": (irrelevant_ratio * 10000.0).round() / 10000.0,
        "irrelevantGoal": IRRELEVANT_GOAL,
        "ours": relevant["agentMeanBytesPerSecond"],
        "baseline": relevant["baselineBytesPerSecond"],
    });
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("apiload.json"), serde_json::to_string_pretty(&report)?)?;
    eprintln!("{}", serde_json::to_string_pretty(&report)?);
    eprintln!(
        "irrelevant churn: an agent receives {:.4} % of the baseline's bytes (goal: under {} %)",
        irrelevant_ratio * 100.0,
        IRRELEVANT_GOAL * 100.0
    );
    drop((agents, controller));
    runtime.block_on(server.shutdown());
    let _ = std::fs::remove_dir_all(&dir);
    anyhow::ensure!(irrelevant_ratio < IRRELEVANT_GOAL, "the irrelevant churn's goal is not met");
    Ok(())
}
