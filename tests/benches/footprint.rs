//! The footprint of the real agent and controller: resident memory and idle
//! CPU after they have synced a cluster, which is where the DaemonSet's and
//! the Deployment's resource requests and limits come from.
//!
//! The cluster is the test API server's (a test double): `FOOTPRINT_SERVICES`
//! WeightedServices (default 50) of `FOOTPRINT_REPLICAS` pods each (default
//! 10), beside `FOOTPRINT_OTHER_PODS` pods no WeightedService selects
//! (default 2000: the agent watches the metadata of every pod). On this
//! machine the agent has no IPVS (its passes fail to open it and retry), so
//! its dumps and writes are not in the numbers: the `ipvs-apply` benchmark
//! measures those.
//!
//! Writes `target/bench/footprint.json`: `ours` is the agent's resident memory
//! in MiB, `baseline` the target it must stay under (64 MiB), plus the idle CPU
//! share and the controller's numbers.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ipvs_operator_tests::apiserver::{Config, TestApiServer, kubeconfig_yaml};
use ipvs_operator_tests::procstat::{clock_ticks_per_second, cpu_ticks, status_kib};

mod process;
use process::{Process, sample};

/// The agent's memory target (issue 7).
const AGENT_RSS_TARGET_MIB: f64 = 64.0;

fn env_number(name: &str, default: usize) -> Result<usize> {
    match std::env::var(name) {
        Ok(text) => text.parse().with_context(|| format!("{name}={text} is not a number")),
        Err(_) => Ok(default),
    }
}

/// The cluster: one Deployment and one WeightedService per service, 20 to a
/// namespace (the test API server's built-in controllers work per namespace,
/// and every change reconciles its whole namespace), and the background pods
/// in a namespace of their own.
fn cluster(services: usize, replicas: usize, other_pods: usize) -> String {
    let mut yaml = String::new();
    for i in 0..services {
        let ns = i / 20;
        yaml.push_str(&format!(
            r#"---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web-{i}, namespace: shop-{ns}}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: web-{i}}}}}
  template:
    metadata: {{labels: {{app: web-{i}, env: prod, team: shop, tier: frontend}}}}
    spec: {{containers: [{{name: web, image: web, ports: [{{containerPort: 8080, name: www}}]}}]}}
---
apiVersion: codesink.net/v1alpha1
kind: WeightedService
metadata: {{name: web-{i}, namespace: shop-{ns}}}
spec:
  selector: {{app: web-{i}}}
  ports: [{{protocol: TCP, port: 80, targetPort: www}}]
  scheduler: wrr
  weights: [{{weight: 10, selector: {{env: prod}}}}]
"#
        ));
    }
    yaml.push_str(&format!(
        r#"---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: background, namespace: other}}
spec:
  replicas: {other_pods}
  selector: {{matchLabels: {{app: background}}}}
  template:
    metadata: {{labels: {{app: background, team: other, tier: batch}}}}
    spec: {{containers: [{{name: job, image: job}}]}}
"#
    ));
    yaml
}

/// Waits until the process's caches hold `pods` pods.
fn wait_synced(process: &Process, pods: u64, what: &str) -> Result<()> {
    process.wait_for(
        &format!("the {what} syncing {pods} pods"),
        Duration::from_secs(120),
        |page| sample(page, "ipvs_operator_watched_objects{kind=\"Pod\"}") == Some(pods as f64),
    )
}

struct Footprint {
    rss_mib: f64,
    peak_mib: f64,
    idle_cpu_percent: f64,
}

fn main() -> Result<()> {
    let services = env_number("FOOTPRINT_SERVICES", 50)?;
    let replicas = env_number("FOOTPRINT_REPLICAS", 10)?;
    let other_pods = env_number("FOOTPRINT_OTHER_PODS", 2000)?;
    let idle = Duration::from_secs(env_number("FOOTPRINT_IDLE_SECONDS", 60)? as u64);
    let pods = (services * replicas + other_pods) as u64;

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let config = Config { max_events: 100_000, bookmark_interval: Duration::from_secs(60), ..Config::default() };
    let server = runtime.block_on(TestApiServer::start(config))?;
    server.handle().load_manifests(&cluster(services, replicas, other_pods))?;

    let dir = std::env::temp_dir().join(format!("ipvs-operator-footprint-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, kubeconfig_yaml(server.url()))?;

    let controller = Process::start(&["controller"], &kubeconfig, &dir.join("controller.log"))?;
    let agent = Process::start(
        &["agent", "--drift-interval=2s"],
        &kubeconfig,
        &dir.join("agent.log"),
    )?;
    let started = Instant::now();
    wait_synced(&controller, pods, "controller")?;
    wait_synced(&agent, pods, "agent")?;
    eprintln!("synced {pods} pods and {services} WeightedServices in {:.1} s", started.elapsed().as_secs_f64());
    // Let the first passes and the controller's reconciles finish.
    std::thread::sleep(Duration::from_secs(10));

    let ticks_per_second = clock_ticks_per_second() as f64;
    let measure = |process: &Process, before: u64| -> Result<Footprint> {
        let pid = process.child.id();
        let ticks = cpu_ticks(pid)? - before;
        Ok(Footprint {
            rss_mib: status_kib(pid, "VmRSS:")? as f64 / 1024.0,
            peak_mib: status_kib(pid, "VmHWM:")? as f64 / 1024.0,
            idle_cpu_percent: ticks as f64 / ticks_per_second / idle.as_secs_f64() * 100.0,
        })
    };
    let (agent_before, controller_before) = (cpu_ticks(agent.child.id())?, cpu_ticks(controller.child.id())?);
    std::thread::sleep(idle);
    let agent_fp = measure(&agent, agent_before)?;
    let controller_fp = measure(&controller, controller_before)?;

    for (name, fp) in [("agent", &agent_fp), ("controller", &controller_fp)] {
        eprintln!(
            "{name}: RSS {:.1} MiB (peak {:.1} MiB), idle CPU {:.2} % of one core over {} s",
            fp.rss_mib,
            fp.peak_mib,
            fp.idle_cpu_percent,
            idle.as_secs()
        );
    }
    let round = |x: f64| (x * 100.0).round() / 100.0;
    let report = serde_json::json!({
        "name": "footprint",
        "what": format!("the agent's resident memory after syncing {services} WeightedServices x {replicas} pods and {other_pods} other pods, then {} s idle (baseline: the 64 MiB target); no IPVS on this machine", idle.as_secs()),
        "ours": round(agent_fp.rss_mib),
        "baseline": AGENT_RSS_TARGET_MIB,
        "unit": "MiB",
        "ratio": round(agent_fp.rss_mib / AGENT_RSS_TARGET_MIB),
        "n": pods,
        "agentPeakMiB": round(agent_fp.peak_mib),
        "agentIdleCpuPercent": round(agent_fp.idle_cpu_percent),
        "controllerRssMiB": round(controller_fp.rss_mib),
        "controllerPeakMiB": round(controller_fp.peak_mib),
        "controllerIdleCpuPercent": round(controller_fp.idle_cpu_percent),
        "services": services,
        "replicas": replicas,
        "otherPods": other_pods,
    });
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("footprint.json"), serde_json::to_string_pretty(&report)? + "\n")?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    drop((agent, controller));
    runtime.block_on(server.shutdown());
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
