//! The footprint of the real agent and controller: resident memory and idle
//! CPU after they have synced a cluster, which is where the DaemonSet's and
//! the Deployment's resource requests and limits come from.
//!
//! The cluster is the test API server's (a test double): `FOOTPRINT_SERVICES`
//! WeightedServices (default 50) of `FOOTPRINT_REPLICAS` pods each (default
//! 10), beside `FOOTPRINT_OTHER_PODS` pods no WeightedService selects
//! (default 2000: the controller watches every pod). The agent watches no
//! pods: it caches the PodInfoSlices the controller publishes of the selected
//! ones (one per 100 pods of a WeightedService), and counts as synced when it
//! holds all of them. On this machine the agent has no IPVS (its passes fail
//! to open it and retry), so its dumps and writes are not in the numbers: the
//! `ipvs-apply` benchmark measures those.
//!
//! Every build of `ipvs-operator` that `FOOTPRINT_BINARIES` names
//! (`LABEL=PATH …`, paths relative to the workspace; default
//! `glibc=target/release/ipvs-operator`) is measured in the same run, one
//! after the other, each against a fresh test API server holding the same
//! cluster; `FOOTPRINT_ROUNDS` (default 1) repeats that, in alternating order,
//! and the figures are the rounds' means; `FOOTPRINT_ARGS` adds flags to both
//! processes of every binary. `make bench` names the binary we
//! ship first (`musl`: `make musl-binary`) and target/release's (`glibc`, the
//! build every test runs) second.
//!
//! Writes `target/bench/footprint.json`: `ours` is the first binary's agent
//! resident memory in MiB after the idle time, `baseline` the second's (with
//! one binary, the 64 MiB target), and under `binaries` every binary's figures
//! for the agent and the controller: resident memory idle and at its peak, CPU
//! time until synced (and its policy compiler children's), idle CPU share.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ipvs_operator_tests::apiserver::{Config, TestApiServer, kubeconfig_yaml};
use ipvs_operator_tests::procstat::{clock_ticks_per_second, cpu_ticks, status_kib};
use ipvs_operator_tests::project_binary;

mod process;
use process::{Process, env_number, sample};

/// The agent's memory target (issue 7).
const AGENT_RSS_TARGET_MIB: f64 = 64.0;


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

/// Waits until the process's cache of `kind` holds `count` objects.
fn wait_synced(process: &Process, kind: &str, count: u64, what: &str) -> Result<()> {
    let series = format!("ipvs_operator_watched_objects{{kind=\"{kind}\"}}");
    process.wait_for(&format!("the {what} syncing {count} of kind {kind}"), Duration::from_secs(120), |page| {
        sample(page, &series) == Some(count as f64)
    })
}

/// The PodInfoSlices the controller publishes: one per 100 pods (or part) of each WeightedService.
fn pod_info_slices(setup: &Setup) -> u64 {
    (setup.services * setup.replicas.div_ceil(ipvs_operator::crd::PODS_PER_SLICE)) as u64
}

/// One process's figures.
#[derive(Clone, Default)]
struct Footprint {
    rss_mib: f64,
    /// The anonymous part of `rss_mib` (heap, stacks): the rest is the
    /// executable's pages and other files.
    anon_mib: f64,
    peak_mib: f64,
    idle_cpu_percent: f64,
    /// Wall time from its start until its caches held every pod (the
    /// controller) or every PodInfoSlice (the agent).
    sync_seconds: f64,
    /// Its CPU time from its start until 10 s after it synced.
    sync_cpu_seconds: f64,
    /// Its finished children's CPU time then: the policy compiler's.
    compile_cpu_seconds: f64,
}

impl Footprint {
    fn json(&self) -> serde_json::Value {
        let round = |x: f64| (x * 100.0).round() / 100.0;
        serde_json::json!({
            "rssMiB": round(self.rss_mib),
            "anonMiB": round(self.anon_mib),
            "peakMiB": round(self.peak_mib),
            "idleCpuPercent": (self.idle_cpu_percent * 1000.0).round() / 1000.0,
            "syncSeconds": round(self.sync_seconds),
            "syncCpuSeconds": round(self.sync_cpu_seconds),
            "compileCpuSeconds": round(self.compile_cpu_seconds),
        })
    }

    /// The mean of several rounds' figures.
    fn mean(all: &[Footprint]) -> Footprint {
        let n = all.len().max(1) as f64;
        let avg = |f: fn(&Footprint) -> f64| all.iter().map(f).sum::<f64>() / n;
        Footprint {
            rss_mib: avg(|f| f.rss_mib),
            anon_mib: avg(|f| f.anon_mib),
            peak_mib: avg(|f| f.peak_mib),
            idle_cpu_percent: avg(|f| f.idle_cpu_percent),
            sync_seconds: avg(|f| f.sync_seconds),
            sync_cpu_seconds: avg(|f| f.sync_cpu_seconds),
            compile_cpu_seconds: avg(|f| f.compile_cpu_seconds),
        }
    }
}

/// CPU time (user + system) of process `pid`'s children that it waited for, in
/// clock ticks: its policy compiles (`cutime` and `cstime` of /proc/PID/stat).
fn children_cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("/proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // cutime and cstime are fields 16 and 17 of stat; 14 and 15 after the name and state.
    let cutime: u64 = fields.get(13).context("cutime")?.parse()?;
    let cstime: u64 = fields.get(14).context("cstime")?.parse()?;
    Ok(cutime + cstime)
}

/// A build of `ipvs-operator` to measure.
struct Binary {
    label: String,
    path: PathBuf,
}

/// `FOOTPRINT_BINARIES`: `LABEL=PATH …`; target/release's, labelled glibc, by default.
fn binaries() -> Result<Vec<Binary>> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let Ok(list) = std::env::var("FOOTPRINT_BINARIES") else {
        return Ok(vec![Binary { label: "glibc".into(), path: project_binary("ipvs-operator")? }]);
    };
    let mut binaries = Vec::new();
    for entry in list.split_whitespace() {
        let (label, path) = entry.split_once('=').with_context(|| format!("FOOTPRINT_BINARIES: {entry} is not LABEL=PATH"))?;
        let path = workspace.join(path);
        anyhow::ensure!(path.is_file(), "FOOTPRINT_BINARIES: {label}: {} does not exist (`make musl-binary` builds the shipped one)", path.display());
        binaries.push(Binary { label: label.into(), path });
    }
    anyhow::ensure!(!binaries.is_empty(), "FOOTPRINT_BINARIES names no binary");
    Ok(binaries)
}

/// The cluster's size and how long to stay idle.
struct Setup {
    services: usize,
    replicas: usize,
    other_pods: usize,
    idle: Duration,
    /// `FOOTPRINT_ARGS`: more flags for the agent and the controller.
    args: Vec<String>,
}

/// One binary's agent and controller against a fresh test API server.
fn measure(runtime: &tokio::runtime::Runtime, binary: &Binary, setup: &Setup) -> Result<(Footprint, Footprint)> {
    let pods = (setup.services * setup.replicas + setup.other_pods) as u64;
    let config = Config { max_events: 100_000, bookmark_interval: Duration::from_secs(60), ..Config::default() };
    let server = runtime.block_on(TestApiServer::start(config))?;
    server.handle().load_manifests(&cluster(setup.services, setup.replicas, setup.other_pods))?;

    let dir = std::env::temp_dir().join(format!("ipvs-operator-footprint-{}-{}", std::process::id(), binary.label));
    std::fs::create_dir_all(&dir)?;
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, kubeconfig_yaml(server.url()))?;

    let started = Instant::now();
    let with_args = |first: &[&'static str]| -> Vec<&str> { first.iter().copied().chain(setup.args.iter().map(String::as_str)).collect() };
    let controller = Process::start_binary(&binary.path, &with_args(&["controller"]), &kubeconfig, &dir.join("controller.log"))?;
    let agent = Process::start_binary(&binary.path, &with_args(&["agent", "--drift-interval=2s"]), &kubeconfig, &dir.join("agent.log"))?;
    wait_synced(&controller, "Pod", pods, "controller")?;
    let controller_synced = started.elapsed();
    let slices = pod_info_slices(setup);
    wait_synced(&agent, "PodInfoSlice", slices, "agent")?;
    let agent_synced = started.elapsed();
    eprintln!(
        "{}: synced {pods} pods (controller) and {slices} PodInfoSlices (agent) of {} WeightedServices in {:.1} s",
        binary.label,
        setup.services,
        agent_synced.as_secs_f64()
    );
    // Let the first passes and the controller's reconciles finish.
    std::thread::sleep(Duration::from_secs(10));

    let ticks_per_second = clock_ticks_per_second() as f64;
    let (agent_before, controller_before) = (cpu_ticks(agent.child.id())?, cpu_ticks(controller.child.id())?);
    let (agent_children, controller_children) = (children_cpu_ticks(agent.child.id())?, children_cpu_ticks(controller.child.id())?);
    std::thread::sleep(setup.idle);
    let measure = |process: &Process, before: u64, children: u64, synced: Duration| -> Result<Footprint> {
        let pid = process.child.id();
        let ticks = cpu_ticks(pid)? - before;
        Ok(Footprint {
            rss_mib: status_kib(pid, "VmRSS:")? as f64 / 1024.0,
            anon_mib: status_kib(pid, "RssAnon:")? as f64 / 1024.0,
            peak_mib: status_kib(pid, "VmHWM:")? as f64 / 1024.0,
            idle_cpu_percent: ticks as f64 / ticks_per_second / setup.idle.as_secs_f64() * 100.0,
            sync_seconds: synced.as_secs_f64(),
            sync_cpu_seconds: before as f64 / ticks_per_second,
            compile_cpu_seconds: children as f64 / ticks_per_second,
        })
    };
    let agent_fp = measure(&agent, agent_before, agent_children, agent_synced)?;
    let controller_fp = measure(&controller, controller_before, controller_children, controller_synced)?;
    for (name, fp) in [("agent", &agent_fp), ("controller", &controller_fp)] {
        eprintln!(
            "{}: {name}: RSS {:.1} MiB ({:.1} MiB anonymous, peak {:.1} MiB), idle CPU {:.3} % of one core over {} s; synced in {:.1} s, {:.2} s of CPU (+{:.2} s compiling)",
            binary.label,
            fp.rss_mib,
            fp.anon_mib,
            fp.peak_mib,
            fp.idle_cpu_percent,
            setup.idle.as_secs(),
            fp.sync_seconds,
            fp.sync_cpu_seconds,
            fp.compile_cpu_seconds,
        );
    }
    drop((agent, controller));
    runtime.block_on(server.shutdown());
    let _ = std::fs::remove_dir_all(&dir);
    Ok((agent_fp, controller_fp))
}

fn main() -> Result<()> {
    let setup = Setup {
        services: env_number("FOOTPRINT_SERVICES", 50)?,
        replicas: env_number("FOOTPRINT_REPLICAS", 10)?,
        other_pods: env_number("FOOTPRINT_OTHER_PODS", 2000)?,
        idle: Duration::from_secs(env_number("FOOTPRINT_IDLE_SECONDS", 60)? as u64),
        args: std::env::var("FOOTPRINT_ARGS").unwrap_or_default().split_whitespace().map(str::to_string).collect(),
    };
    let rounds = env_number("FOOTPRINT_ROUNDS", 1)?.max(1);
    let pods = (setup.services * setup.replicas + setup.other_pods) as u64;
    let binaries = binaries()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;

    let mut runs: Vec<(Vec<Footprint>, Vec<Footprint>)> = vec![Default::default(); binaries.len()];
    for round in 0..rounds {
        let mut order: Vec<usize> = (0..binaries.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let (agent, controller) = measure(&runtime, &binaries[i], &setup).with_context(|| format!("measuring {}", binaries[i].label))?;
            runs[i].0.push(agent);
            runs[i].1.push(controller);
        }
    }
    let results: Vec<(Footprint, Footprint)> = runs.iter().map(|(a, c)| (Footprint::mean(a), Footprint::mean(c))).collect();

    eprintln!(
        "\n{:<14} {:>10} {:>10} {:>10} {:>9} {:>9} {:>9} | {:>10} {:>10} {:>10} {:>9} {:>9} {:>9}",
        "binary", "agent RSS", "anon", "peak", "idle CPU", "sync CPU", "compile", "ctrl RSS", "anon", "peak", "idle CPU", "sync CPU", "compile"
    );
    for (binary, (agent, controller)) in binaries.iter().zip(&results) {
        eprintln!(
            "{:<14} {:>6.1} MiB {:>6.1} MiB {:>6.1} MiB {:>7.3} % {:>7.2} s {:>7.2} s | {:>6.1} MiB {:>6.1} MiB {:>6.1} MiB {:>7.3} % {:>7.2} s {:>7.2} s",
            binary.label,
            agent.rss_mib,
            agent.anon_mib,
            agent.peak_mib,
            agent.idle_cpu_percent,
            agent.sync_cpu_seconds,
            agent.compile_cpu_seconds,
            controller.rss_mib,
            controller.anon_mib,
            controller.peak_mib,
            controller.idle_cpu_percent,
            controller.sync_cpu_seconds,
            controller.compile_cpu_seconds,
        );
    }

    let round = |x: f64| (x * 100.0).round() / 100.0;
    let (ours_agent, ours_controller) = &results[0];
    let (baseline, baseline_label) = match results.get(1) {
        Some((agent, _)) => (agent.rss_mib, binaries[1].label.clone()),
        None => (AGENT_RSS_TARGET_MIB, "the 64 MiB target".into()),
    };
    let report = serde_json::json!({
        "name": "footprint",
        "what": format!(
            "the agent's resident memory after syncing {} WeightedServices x {} pods (as PodInfoSlices) and {} other \
             pods (the controller's), then {} s idle: {} (ours) against {} (baseline); no IPVS on this machine",
            setup.services, setup.replicas, setup.other_pods, setup.idle.as_secs(), binaries[0].label, baseline_label
        ),
        "ours": round(ours_agent.rss_mib),
        "baseline": round(baseline),
        "unit": "MiB",
        "ratio": round(ours_agent.rss_mib / baseline),
        "n": pods,
        "oursBinary": binaries[0].label,
        "baselineBinary": baseline_label,
        "agentRssTargetMiB": AGENT_RSS_TARGET_MIB,
        "agentPeakMiB": round(ours_agent.peak_mib),
        "agentIdleCpuPercent": round(ours_agent.idle_cpu_percent),
        "controllerRssMiB": round(ours_controller.rss_mib),
        "controllerPeakMiB": round(ours_controller.peak_mib),
        "controllerIdleCpuPercent": round(ours_controller.idle_cpu_percent),
        "binaries": binaries.iter().zip(&results).map(|(binary, (agent, controller))| serde_json::json!({
            "label": binary.label,
            "path": binary.path,
            "agent": agent.json(),
            "controller": controller.json(),
        })).collect::<Vec<_>>(),
        "services": setup.services,
        "replicas": setup.replicas,
        "otherPods": setup.other_pods,
        "podInfoSlices": pod_info_slices(&setup),
        "idleSeconds": setup.idle.as_secs(),
        "rounds": rounds,
    });
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("footprint.json"), serde_json::to_string_pretty(&report)? + "\n")?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    if ours_agent.rss_mib >= AGENT_RSS_TARGET_MIB {
        eprintln!("WARNING: the {} agent's resident memory, {:.1} MiB, is over the {AGENT_RSS_TARGET_MIB} MiB target", binaries[0].label, ours_agent.rss_mib);
    }
    Ok(())
}
