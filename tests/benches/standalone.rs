//! Standalone mode's cost on the data path (issue 20), in the test VM: the
//! same pods behind two ClusterIPs on one node, one Service served by the
//! agent itself (`proxy: ipvs-operator`), one by the kube-proxy emulator (IPVS
//! mode, `--ipvs-exclude-cidrs` covering the first), both weighted by the
//! agent. Measured in one run, so each side is the other's baseline:
//!
//! - connection rate and latency from the client, one connection at a time,
//!   in alternating runs (the order flips each round); the ratio of the
//!   medians of the runs' rates, and of their median latencies (goal: within
//!   5 %; a miss is reported, not failed);
//! - convergence of an endpoint change into the kernel: a ready pod added
//!   (until its destination is in the virtual service) and deleted (until it
//!   is gone or at weight 0), p50 and p99 over the trials, for the agent's
//!   virtual service and for the emulator's.
//!
//! `make bench-standalone` runs it; writes `target/bench/standalone.json`.
//! `STANDALONE_RUNS` (rounds, at least 5), `STANDALONE_CONNECTIONS` (per run)
//! and `STANDALONE_TRIALS` (endpoint changes) override the sizes.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use ipvs::ServiceKey;
use ipvs_operator_tests::apiserver::Grace;
use ipvs_operator_tests::testbed::{pod_manifest, Testbed, TestbedConfig};
use serde_json::{json, Value};

const OURS: &str = "10.96.100.40";
const THEIRS: &str = "10.96.0.40";
const GOAL: f64 = 0.05;

fn env_number(what: &str, default: usize) -> Result<usize> {
    match std::env::var(format!("STANDALONE_{what}")) {
        Ok(v) => v.parse().with_context(|| format!("STANDALONE_{what}={v:?} is not a number")),
        Err(_) => Ok(default),
    }
}

fn weighted_service(name: &str, proxy: &str, cluster_ip: &str) -> String {
    format!(
        "apiVersion: codesink.net/v1alpha1\nkind: WeightedService\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  proxy: {proxy}\n  clusterIP: {cluster_ip}\n  selector: {{app: bench}}\n  ports: [{{protocol: TCP, port: 80, targetPort: www}}]\n  weights:\n  - {{weight: 1, selector: {{app: bench}}}}\n---\n"
    )
}

/// One run: `connections` connections to `target`, one at a time; each one's
/// connect-to-answer time.
fn run(target: SocketAddr, connections: usize) -> Result<Vec<Duration>> {
    let mut latencies = Vec::with_capacity(connections);
    for _ in 0..connections {
        let started = Instant::now();
        let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(5)).with_context(|| format!("connecting to {target}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        if answer.is_empty() {
            bail!("no answer from {target}");
        }
        latencies.push(started.elapsed());
    }
    Ok(latencies)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    percentile(&sorted, 50.0)
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The destinations and weights of the node's virtual service `key`.
fn destinations(bed: &Testbed, key: ServiceKey) -> BTreeMap<SocketAddr, u32> {
    bed.ipvs()
        .into_iter()
        .find(|e| e.service.key == key)
        .map(|e| e.destinations.iter().map(|d| (d.socket_addr(), d.weight)).collect())
        .unwrap_or_default()
}

/// How long until `done` holds for each of `keys` (polled every 5 ms), from `since`.
fn converge(
    bed: &Testbed,
    keys: &[ServiceKey],
    since: Instant,
    done: impl Fn(&BTreeMap<SocketAddr, u32>) -> bool,
) -> Result<Vec<Duration>> {
    let mut took: Vec<Option<Duration>> = vec![None; keys.len()];
    while took.iter().any(Option::is_none) {
        if since.elapsed() > Duration::from_secs(60) {
            bail!("no convergence within 60 s: {took:?}");
        }
        for (key, took) in keys.iter().zip(took.iter_mut()) {
            if took.is_none() && done(&destinations(bed, *key)) {
                *took = Some(since.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(took.into_iter().flatten().collect())
}

fn summary(samples: &[Duration]) -> Value {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    json!({"p50_ms": round(percentile(&ms, 50.0)), "p99_ms": round(percentile(&ms, 99.0)), "max_ms": round(ms.last().copied().unwrap_or(f64::NAN)), "samples": ms.len()})
}

fn main() -> Result<()> {
    let rounds = env_number("RUNS", 7)?.max(5);
    let connections = env_number("CONNECTIONS", 400)?.max(10);
    let trials = env_number("TRIALS", 20)?.max(2);
    let mut bed = Testbed::new(TestbedConfig {
        proxy_scheduler: "wrr".into(),
        proxy_flags: vec!["--ipvs-exclude-cidrs".into(), "10.96.100.0/24".into()],
        ..TestbedConfig::default()
    });
    // As on a node set up for standalone mode (and as kube-proxy's IPVS mode sets it).
    bed.node.sysctls(&[("net.ipv4.vs.conntrack", "1")]);
    let mut yaml = String::new();
    for (name, ip) in [("bench-a", "10.244.0.41"), ("bench-b", "10.244.0.42")] {
        yaml += &pod_manifest(name, &[("app", "bench")], "node-1", ip);
    }
    yaml += &weighted_service("ours", "ipvs-operator", OURS);
    yaml += &weighted_service("theirs", "kube-proxy", THEIRS);
    bed.load(&yaml);
    bed.start_all();
    let ours = ServiceKey::tcp(format!("{OURS}:80").parse()?);
    let theirs = ServiceKey::tcp(format!("{THEIRS}:80").parse()?);
    converge(&bed, &[ours, theirs], Instant::now(), |d| d.len() == 2 && d.values().all(|w| *w > 0))?;

    // Connection rate and latency, alternating.
    let targets = [("agent", SocketAddr::from((OURS.parse::<std::net::IpAddr>()?, 80))), ("kube-proxy", SocketAddr::from((THEIRS.parse::<std::net::IpAddr>()?, 80)))];
    // A warm-up run each (caches, the scheduler's first picks), not counted.
    for (_, target) in targets {
        bed.client.enter(|| run(target, connections / 4))?;
    }
    let mut rates: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut run_latency_medians: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut all_latencies: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    for round_number in 0..rounds {
        let order: Vec<_> = if round_number % 2 == 0 { targets.to_vec() } else { targets.iter().rev().copied().collect() };
        for (path, target) in order {
            let started = Instant::now();
            let latencies = bed.client.enter(|| run(target, connections))?;
            let elapsed = started.elapsed().as_secs_f64();
            rates.entry(path).or_default().push(connections as f64 / elapsed);
            let ms: Vec<f64> = latencies.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
            run_latency_medians.entry(path).or_default().push(median(&ms));
            all_latencies.entry(path).or_default().extend(latencies);
        }
    }
    let rate_ratio = median(&rates["agent"]) / median(&rates["kube-proxy"]);
    let latency_ratio = median(&run_latency_medians["agent"]) / median(&run_latency_medians["kube-proxy"]);
    let met = (rate_ratio - 1.0).abs() <= GOAL && (latency_ratio - 1.0).abs() <= GOAL;

    // Convergence of endpoint changes, both virtual services at once.
    let mut added: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    let mut removed: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    for trial in 0..trials {
        let name = format!("bench-new-{trial}");
        let ip = format!("10.244.1.{}", trial % 250 + 1);
        let endpoint: SocketAddr = format!("{ip}:8080").parse()?;
        let since = Instant::now();
        bed.handle().load_manifests(&pod_manifest(&name, &[("app", "bench")], "node-1", &ip)).map_err(|e| anyhow::anyhow!("{e}"))?;
        let took = converge(&bed, &[ours, theirs], since, |d| d.get(&endpoint).is_some_and(|w| *w > 0))?;
        added.entry("agent").or_default().push(took[0]);
        added.entry("kube-proxy").or_default().push(took[1]);
        let since = Instant::now();
        bed.handle().delete_pod("default", &name, Grace::Immediate).map_err(|e| anyhow::anyhow!("{e}"))?;
        let took = converge(&bed, &[ours, theirs], since, |d| d.get(&endpoint).is_none_or(|w| *w == 0))?;
        removed.entry("agent").or_default().push(took[0]);
        removed.entry("kube-proxy").or_default().push(took[1]);
    }

    let path_report = |path: &str| {
        let mut rs = rates[path].clone();
        rs.sort_by(f64::total_cmp);
        json!({
            "connections_per_second": {"median": round(median(&rs)), "runs": rs.iter().map(|r| round(*r)).collect::<Vec<_>>()},
            "latency": summary(&all_latencies[path]),
            "convergence": {"endpoint_added": summary(&added[path]), "endpoint_removed": summary(&removed[path])},
        })
    };
    let report = json!({
        "bench": "standalone",
        "what": "one connection at a time from a client outside the node to a ClusterIP: a virtual service the agent serves itself against one the kube-proxy emulator (IPVS mode) serves, same pods, same node, alternating runs",
        "rounds": rounds,
        "connections_per_run": connections,
        "convergence_trials": trials,
        "agent": path_report("agent"),
        "kube_proxy": path_report("kube-proxy"),
        "ratio_of_medians": {"connections_per_second": round(rate_ratio), "latency": round(latency_ratio)},
        "goal": {"within": GOAL, "met": met},
    });
    if !met {
        eprintln!("standalone: goal missed: the agent's virtual service is not within {:.0} % of kube-proxy's (rate ratio {rate_ratio:.3}, latency ratio {latency_ratio:.3})", GOAL * 100.0);
    }
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("standalone.json"), serde_json::to_string_pretty(&report)? + "\n")?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
