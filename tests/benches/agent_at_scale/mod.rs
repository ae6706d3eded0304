//! The real agent at scale, on a real kernel's IPVS (in the test VM): shared
//! by the `convergence` bench (issue 5: 1,000 WeightedServices, 10,000
//! endpoints) and the `scale` bench (issue 8: 5,000 and 50,000, plus an agent
//! restart, the controller under churn and a profile). Each bench is a
//! [`Preset`]; `PREFIX_…` environment variables (`CONVERGENCE_…`, `SCALE_…`)
//! override its sizes.
//!
//! `PREFIX_SERVICES` WeightedServices of `PREFIX_PODS` pods each in the test
//! API server, their Services (as the controller creates them: owned,
//! labelled) and the PodInfoSlices the controller publishes of their pods
//! (made with its own functions, from the pods loaded: the agent watches no
//! pods), the kube-proxy emulator programming the virtual services and
//! destinations (scheduler wrr, as the README advises), and one
//! `ipvs-operator agent` with its default drift interval (2 s).
//!
//! Measured:
//! - edit → kernel: a WeightedService's weights are changed with a merge patch
//!   through the API; the time from sending the patch until the kernel has the
//!   new weight on every destination of its virtual service (read with our
//!   netlink client every millisecond), over `PREFIX_EDITS` edits
//!   (default 100) of different WeightedServices, at irregular intervals so
//!   that they land anywhere in the drift loop's cycle: p50 and p99;
//! - the agent's resident memory (VmRSS) after the edits;
//! - its CPU while idle with the drift loop on (utime + stime over
//!   `PREFIX_IDLE_SECONDS`, default 30), as percent of one core, in total and
//!   per thread (`agent-passes` is the work loop, `tokio-runtime-w` the watches);
//! - (`PREFIX_RESTART_EDITS` > 0) an agent restart: the agent is killed, that
//!   many WeightedServices are edited while it is down, and it is started
//!   again: the time until it is ready (its first pass done) and until every
//!   edit is in the kernel, and its writes (only the edits' destinations);
//! - (`PREFIX_CHURN_SECONDS` > 0) the controller: started on the whole
//!   cluster (it applies every Service and writes every status: how long
//!   that takes; the PodInfoSlices it finds are already what it would
//!   publish, so it writes none), then pods' `env` labels flipped every 100 ms
//!   across the WeightedServices: the controller's status and PodInfoSlice
//!   writes per second during the churn (from the test API server's request
//!   log) against the changes made;
//! - (`PREFIX_PERF=1` and a `perf` binary in the VM: `make bench-scale` adds the
//!   host's) a profile of the agent (`perf record`, 99 Hz, DWARF call graphs)
//!   during a second restart and during an idle window: where its time goes,
//!   written to `target/bench/NAME-profile-PHASE.txt` and summarised in the JSON.
//!
//! Baseline, in the same run and kernel, once the agent is stopped: the same
//! weight changes on the same virtual services written directly with the ipvs
//! crate (dump the service's destinations, write the new weights, read them
//! back): the kernel's share of an edit, which no agent can beat. The agent's
//! time above it is the watch, the pass and the policy evaluation.
//!
//! For idle CPU, the floor of a periodic comparison is what reading the table
//! costs: the same run measures one netlink dump of the whole table with the
//! ipvs crate (one request per virtual service), one read of
//! `/proc/net/ip_vs`, and one read through `getsockopt` with
//! `ipvs::SockoptTable` (the agent's sweep reads that — or the text, when it
//! has IPv6 virtual services — and netlink only for what differs), each as a
//! share of one core at one read per drift interval: the reading thread's CPU
//! time (user and kernel, as the agent's idle CPU is counted), the median of
//! nine reads, since one read's wall time under TCG varies by half. The
//! getsockopt read is measured back to back and, as the agent reads, once per
//! drift interval (`sockoptSpacedRead…`): `idleCpuRatio` sets the agent's idle
//! run time (`idleRunPercent`, from `schedstat`; `idleCpuPercent` is the tick
//! count) against the latter.
//!
//! Pods have no network-namespace backends (weights need none), and the
//! controller runs only in the churn phase (the Services and PodInfoSlices it
//! would write are loaded directly): the CPU is the agent's. Writes
//! `target/bench/NAME.json`.
//! `PREFIX_AGENT_LOG=1` prints the agent's log and `PREFIX_SMAPS=1` its largest
//! mappings.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ipvs::{IpvsClient, ServiceKey, Write};
use ipvs_operator::cluster::selects;
use ipvs_operator::crd::{PodInfo, WeightedService};
use ipvs_operator::pod_info::{plan_slices, pod_info, slice_object};
use ipvs_operator::snapshot::PodMeta;
use ipvs_operator_tests::procstat::{clock_ticks_per_second, cpu_ticks, status_kib};
use ipvs_operator_tests::testbed::{Testbed, TestbedConfig, NODE_NAME};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use kube::ResourceExt;
use serde_json::{json, Value};

/// A bench: its name (of the JSON file), the prefix of its environment
/// variables, and its default sizes.
pub struct Preset {
    /// `target/bench/NAME.json`.
    pub name: &'static str,
    /// `PREFIX_SERVICES`, `PREFIX_PODS`, …
    pub env_prefix: &'static str,
    /// WeightedServices.
    pub services: usize,
    /// Pods (endpoints) per WeightedService.
    pub pods: usize,
    /// Edits measured.
    pub edits: usize,
    /// Seconds of idle measured.
    pub idle_seconds: usize,
    /// WeightedServices edited while the agent is down (0: no restart phase).
    pub restart_edits: usize,
    /// Seconds of pod label churn with the controller (0: no controller phase).
    pub churn_seconds: usize,
    /// The goals the results are held to: p99 edit → kernel (ms), RSS (MiB),
    /// idle CPU (% of a core).
    pub goals: (f64, f64, f64),
}

/// What a run uses: the preset with the environment's overrides.
struct Params {
    name: &'static str,
    prefix: &'static str,
    services: usize,
    pods: usize,
    edits: usize,
    idle: Duration,
    restart_edits: usize,
    churn: Duration,
    perf: bool,
    goals: (f64, f64, f64),
}

impl Params {
    fn var(&self, what: &str) -> String {
        format!("{}_{what}", self.prefix)
    }

    fn flag(&self, what: &str) -> bool {
        std::env::var_os(self.var(what)).is_some_and(|v| !v.is_empty() && v != "0")
    }
}

/// The idle agent's CPU at most this many times the bare `getsockopt` read of
/// the table (issue 18's goal).
const IDLE_CPU_RATIO_GOAL: f64 = 1.5;

/// The agent's default drift interval.
const DRIFT_INTERVAL: Duration = Duration::from_secs(2);
/// kube-proxy's default sync period.
const PROXY_SYNC_PERIOD: Duration = Duration::from_secs(30);

/// WeightedServices per namespace: the test API server's built-in controllers
/// work per namespace, so a namespace of 10,000 pods would make every change
/// cost it seconds under the VM's emulated CPU.
const PER_NAMESPACE: usize = 10;

fn env_number(prefix: &str, what: &str, default: usize) -> Result<usize> {
    let name = format!("{prefix}_{what}");
    match std::env::var(&name) {
        Ok(text) => text.parse().with_context(|| format!("{name}={text} is not a number")),
        Err(_) => Ok(default),
    }
}

/// Namespace and name of WeightedService `i`.
fn ws_id(i: usize) -> (String, String) {
    (format!("bench-{:03}", i / PER_NAMESPACE), format!("ws-{i:04}"))
}

/// The IP of pod `k` of WeightedService `i` (fixed, so the API server's
/// emulated kubelet does not search for a free one).
fn pod_ip(i: usize, k: usize, pods: usize) -> IpAddr {
    let n = i * pods + k;
    IpAddr::from([10, 244, (n / 250) as u8, (n % 250 + 2) as u8])
}

/// The canary is the last pod of each WeightedService; the others are prod.
fn is_canary(k: usize, pods: usize) -> bool {
    k + 1 == pods
}

/// Weights (prod, canary) of each phase: 0 is the initial state, then the
/// edits alternate between two values, then the baseline's two values.
fn weights(phase: usize) -> (u16, u16) {
    match phase {
        0 => (10, 1),
        1 => (20, 2),
        2 => (30, 3),
        3 => (40, 4),
        _ => (50, 5),
    }
}

fn weight_groups(phase: usize) -> Value {
    let (prod, canary) = weights(phase);
    json!([{"weight": prod, "selector": {"env": "prod"}}, {"weight": canary, "selector": {"env": "canary"}}])
}

/// WeightedServices and their pods (bare pods, bound to the node, with fixed IPs).
fn cluster(services: usize, pods: usize) -> String {
    let mut docs = Vec::new();
    for i in 0..services {
        let (ns, name) = ws_id(i);
        docs.push(json!({
            "apiVersion": "codesink.net/v1alpha1", "kind": "WeightedService",
            "metadata": {"name": name, "namespace": ns},
            "spec": {
                "selector": {"app": name},
                "ports": [{"protocol": "TCP", "port": 80, "targetPort": "www"}],
                "scheduler": "wrr",
                "weights": weight_groups(0),
            }
        }));
        for k in 0..pods {
            let env = if is_canary(k, pods) { "canary" } else { "prod" };
            docs.push(json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {
                    "name": format!("{name}-{k}"), "namespace": ns,
                    "labels": {"app": name, "env": env},
                    "annotations": {"test-apiserver.codesink.net/pod-ip": pod_ip(i, k, pods).to_string()},
                },
                "spec": {
                    "nodeName": NODE_NAME,
                    "containers": [{"name": "web", "image": "web", "ports": [{"containerPort": 8080, "name": "www"}]}],
                }
            }));
        }
    }
    json!({"apiVersion": "v1", "kind": "List", "items": docs}).to_string()
}

/// The Services the controller would create for them: labelled and owned (the
/// agent follows only those), the WeightedService's ServiceSpec.
fn services_manifest(bed: &Testbed) -> String {
    let items: Vec<Value> = bed
        .handle()
        .list("weightedservices", None)
        .iter()
        .map(|ws| {
            let name = ws["metadata"]["name"].clone();
            json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {
                    "name": name, "namespace": ws["metadata"]["namespace"],
                    "labels": {"codesink.net/weighted-service": name, "app.kubernetes.io/managed-by": "ipvs-operator"},
                    "ownerReferences": [{
                        "apiVersion": "codesink.net/v1alpha1", "kind": "WeightedService", "name": name,
                        "uid": ws["metadata"]["uid"], "controller": true, "blockOwnerDeletion": true,
                    }],
                },
                "spec": {"selector": ws["spec"]["selector"], "ports": ws["spec"]["ports"]},
            })
        })
        .collect();
    json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string()
}

/// What the controller reads of a pod (its pod watch): labels, creation time,
/// and since when it has been Ready (its Ready condition's transition time).
fn pod_meta(pod: &Pod) -> PodMeta {
    let conditions = pod.status.as_ref().and_then(|s| s.conditions.as_ref());
    let ready = conditions.and_then(|c| c.iter().find(|c| c.type_ == "Ready"));
    PodMeta {
        labels: std::sync::Arc::new(pod.metadata.labels.clone().unwrap_or_default()),
        created: pod.metadata.creation_timestamp.as_ref().map(|t| t.0),
        ready_since: ready.filter(|c| c.status == "True").and_then(|c| c.last_transition_time.as_ref()).map(|t| t.0),
    }
}

/// The PodInfoSlices the controller would publish for the WeightedServices
/// (the agent reads its pods' labels from them, and watches no pods): made
/// with the controller's own functions from the pods the API server holds,
/// each WeightedService's selected pods in slices of at most 100, labelled
/// and owned. The controller, started later, finds nothing to write in them.
fn pod_info_slices_manifest(bed: &Testbed) -> Result<String> {
    let mut pods: BTreeMap<String, Vec<(String, PodMeta)>> = BTreeMap::new();
    for value in bed.handle().list("pods", None) {
        let pod: Pod = serde_json::from_value(value).context("a pod of the API server")?;
        pods.entry(pod.namespace().unwrap_or_default()).or_default().push((pod.name_any(), pod_meta(&pod)));
    }
    let mut items = Vec::new();
    for value in bed.handle().list("weightedservices", None) {
        let ws: WeightedService = serde_json::from_value(value).context("a WeightedService of the API server")?;
        let selector = ws.spec.service.selector.as_ref().filter(|s| !s.is_empty());
        let selected: Vec<PodInfo> = pods
            .get(&ws.namespace().unwrap_or_default())
            .into_iter()
            .flatten()
            .filter(|(_, meta)| selector.is_some() && selects(selector, &meta.labels))
            .map(|(name, meta)| pod_info(name, meta))
            .collect();
        for (name, pods) in plan_slices(&ws.name_any(), &[], selected).writes {
            items.push(serde_json::to_value(slice_object(&ws, &name, pods))?);
        }
    }
    Ok(json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string())
}

/// What the kernel must show for WeightedService `i` in `phase`.
struct Target {
    key: ServiceKey,
    want: BTreeMap<SocketAddr, u32>,
}

fn target(vip: IpAddr, i: usize, pods: usize, phase: usize) -> Target {
    let (prod, canary) = weights(phase);
    let want = (0..pods)
        .map(|k| (SocketAddr::new(pod_ip(i, k, pods), 8080), u32::from(if is_canary(k, pods) { canary } else { prod })))
        .collect();
    Target { key: ServiceKey::tcp(SocketAddr::new(vip, 80)), want }
}

/// Whether the kernel has every weight of `target`.
fn reached(client: &mut IpvsClient, target: &Target) -> Result<bool> {
    let destinations = client.destinations(&target.key)?;
    let have: BTreeMap<SocketAddr, u32> = destinations.iter().map(|d| (d.socket_addr(), d.weight)).collect();
    Ok(have == target.want)
}

/// Poll the kernel every millisecond until it has `target`; when it did.
fn wait_for(client: &mut IpvsClient, target: &Target, timeout: Duration) -> Result<Option<Instant>> {
    let deadline = Instant::now() + timeout;
    loop {
        if reached(client, target)? {
            return Ok(Some(Instant::now()));
        }
        if Instant::now() > deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The `p`th percentile (nearest rank) of sorted samples.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The agent's PID: the process whose command line is `…/ipvs-operator agent …`.
fn agent_pid() -> Result<u32> {
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args.len() > 1 && args[0].ends_with(b"/ipvs-operator") && args[1] == b"agent" {
            return Ok(pid);
        }
    }
    bail!("no ipvs-operator agent process")
}

/// The mappings of a process holding the most resident memory (diagnostics).
fn print_smaps(pid: u32) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut maps: Vec<(u64, String)> = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        if let Some(kib) = line.strip_prefix("Rss:") {
            let kib: u64 = kib.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
            maps.push((kib, current.clone()));
        } else if line.split_whitespace().next().is_some_and(|w| w.contains('-') && !w.ends_with(':')) {
            current = line.to_string();
        }
    }
    maps.sort_by_key(|m| std::cmp::Reverse(m.0));
    eprintln!("agent smaps: {} mappings, {} kB resident; largest:", maps.len(), maps.iter().map(|m| m.0).sum::<u64>());
    for (kib, map) in maps.iter().take(20) {
        eprintln!("{kib:>8} kB  {map}");
    }
}




fn metric(bed: &Testbed, name: &str, labels: &str) -> f64 {
    bed.agent_metric(name, labels).unwrap_or(0.0)
}

/// Sum and count of the agent's pass-time histogram.
fn passes(bed: &Testbed) -> (f64, f64) {
    (metric(bed, "ipvs_operator_reconcile_seconds_sum", ""), metric(bed, "ipvs_operator_reconcile_seconds_count", ""))
}

/// Sweeps the agent started, and its sweep thread's CPU seconds in each step.
fn sweep_steps(bed: &Testbed) -> Vec<f64> {
    let mut steps = vec![metric(bed, "ipvs_operator_sweeps_total", "")];
    for step in SWEEP_STEPS {
        steps.push(metric(bed, "ipvs_operator_sweep_cpu_seconds_total", &format!("step=\"{step}\"")));
    }
    steps
}

/// The agent's sweep CPU per sweep and step, in ms, from the differences of
/// [`sweep_steps`] over a window.
fn idle_sweep_cpu_ms(steps: &[f64]) -> Value {
    let sweeps = steps[0].max(1.0);
    SWEEP_STEPS.iter().zip(&steps[1..]).map(|(step, seconds)| (step.to_string(), json!(round(seconds / sweeps * 1000.0)))).collect()
}

/// The steps of the agent's sweep, as its metric labels them.
const SWEEP_STEPS: [&str; 3] = ["read", "compare", "cross_check"];

fn wait_until<T>(timeout: Duration, what: &str, poll: Duration, mut check: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check()? {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(poll);
    }
}

/// Run the bench `preset` and write `target/bench/NAME.json`.
pub fn main(preset: Preset) -> Result<()> {
    // `cargo bench` passes --bench; nothing else to parse.
    let prefix = preset.env_prefix;
    let services = env_number(prefix, "SERVICES", preset.services)?;
    let params = Params {
        name: preset.name,
        prefix,
        services,
        pods: env_number(prefix, "PODS", preset.pods)?.max(2),
        edits: env_number(prefix, "EDITS", preset.edits)?.min(services),
        idle: Duration::from_secs(env_number(prefix, "IDLE_SECONDS", preset.idle_seconds)? as u64),
        restart_edits: env_number(prefix, "RESTART_EDITS", preset.restart_edits)?.min(services),
        churn: Duration::from_secs(env_number(prefix, "CHURN_SECONDS", preset.churn_seconds)? as u64),
        perf: false,
        goals: preset.goals,
    };
    let params = Params { perf: params.flag("PERF") && perf_available(), ..params };
    let run_started = Instant::now();
    let name = params.name;
    let phase = move |what: &str, since: Instant| eprintln!("{name}: {what} in {:.1} s", since.elapsed().as_secs_f64());

    let mut bed = Testbed::new(TestbedConfig {
        drift_interval: DRIFT_INTERVAL,
        proxy_scheduler: "wrr".into(),
        proxy_sync_period: PROXY_SYNC_PERIOD,
        // As a real API server sends them: the idle agent's CPU includes
        // reading them.
        bookmark_interval: Some(Duration::from_secs(60)),
        ..TestbedConfig::default()
    });
    let result = run(&mut bed, &params, run_started, &phase);
    if result.is_err() {
        eprintln!("testbed logs (tail):");
        for line in bed.logs().lines().rev().take(60).collect::<Vec<_>>().into_iter().rev() {
            eprintln!("{line}");
        }
    }
    let report = result?;
    let out = bench_dir();
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join(format!("{name}.json")), serde_json::to_string_pretty(&report)? + "\n")?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

fn bench_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench")
}

fn run(bed: &mut Testbed, params: &Params, run_started: Instant, phase: &dyn Fn(&str, Instant)) -> Result<Value> {
    let (services, pods, edits, idle) = (params.services, params.pods, params.edits, params.idle);
    let endpoints = services * pods;
    // The cluster, without backends: loaded into the API server directly.
    let started = Instant::now();
    bed.handle().load_manifests(&cluster(services, pods)).context("loading the WeightedServices and pods")?;
    bed.handle().load_manifests(&services_manifest(bed)).context("loading the Services")?;
    bed.handle().load_manifests(&pod_info_slices_manifest(bed)?).context("loading the PodInfoSlices")?;
    let published: usize =
        bed.handle().list("podinfoslices", None).iter().map(|s| s["spec"]["pods"].as_array().map_or(0, Vec::len)).sum();
    if published != endpoints {
        bail!("the PodInfoSlices hold {published} pods, not {endpoints}");
    }
    let vips: Vec<IpAddr> = (0..services)
        .map(|i| {
            let (ns, name) = ws_id(i);
            bed.get("services", &ns, &name)
                .and_then(|s| s["spec"]["clusterIP"].as_str()?.parse().ok())
                .with_context(|| format!("Service {ns}/{name} has no ClusterIP"))
        })
        .collect::<Result<_>>()?;
    let slices = bed.handle().list("endpointslices", None);
    let sliced: usize = slices.iter().map(|s| s["endpoints"].as_array().map_or(0, Vec::len)).sum();
    if sliced != endpoints {
        bail!("the EndpointSlices hold {sliced} endpoints, not {endpoints}");
    }
    phase(&format!("loaded {services} WeightedServices, Services, {endpoints} pods and their PodInfoSlices"), started);

    // kube-proxy programs the virtual services and destinations.
    let started = Instant::now();
    bed.start_emulator();
    let mut kernel = bed.node.enter(IpvsClient::new).context("IPVS in the node")?;
    wait_until(Duration::from_secs(600), "the emulator's virtual services", Duration::from_secs(2), || {
        let table = kernel.dump()?;
        let dests: usize = table.iter().map(|e| e.destinations.len()).sum();
        Ok((table.len() >= services && dests >= endpoints).then_some(()))
    })?;
    // It binds every ClusterIP to its dummy interface afterwards, one `ip` each.
    wait_until(Duration::from_secs(600), "the emulator's ClusterIP addresses", Duration::from_secs(2), || {
        let out = bed.node.exec_output(&["ip", "-o", "addr", "show", "dev", "kube-ipvs0"]);
        Ok((String::from_utf8_lossy(&out.stdout).lines().count() >= services).then_some(()))
    })?;
    let emulator_seconds = started.elapsed().as_secs_f64();
    phase("the kube-proxy emulator programmed the table", started);

    // The agent: from its start until every weight is in the kernel.
    let started = Instant::now();
    bed.start_agent();
    let initial_writes = (pods - 1) * services; // canaries are already at 1
    wait_until(Duration::from_secs(900), "the agent's first weights", Duration::from_millis(100), || {
        Ok((metric(bed, "ipvs_operator_netlink_writes_total", "kind=\"weight\"") >= initial_writes as f64).then_some(()))
    })?;
    let initial_converge = started.elapsed();
    let table = kernel.dump()?;
    let wrong = (0..services)
        .filter(|&i| {
            let t = target(vips[i], i, pods, 0);
            let have: Option<BTreeMap<SocketAddr, u32>> = table
                .iter()
                .find(|e| e.service.key == t.key)
                .map(|e| e.destinations.iter().map(|d| (d.socket_addr(), d.weight)).collect());
            have.as_ref() != Some(&t.want)
        })
        .count();
    if wrong > 0 {
        bail!("after the agent's first weights, {wrong} virtual services differ from the WeightedServices");
    }
    phase("the agent converged from its start", started);
    let pid = agent_pid()?;
    let rss_start_mib = status_kib(pid, "VmRSS:")? as f64 / 1024.0;
    // Let the first passes and the emulator's follow-up sync go by.
    std::thread::sleep(Duration::from_secs(5));

    // The edits.
    let started = Instant::now();
    let client = bed.client();
    let writes_before = metric(bed, "ipvs_operator_netlink_writes_total", "kind=\"weight\"");
    let repairs_before = metric(bed, "ipvs_operator_drift_repairs_total", "");
    let mut latencies = Vec::with_capacity(edits);
    let mut acked = Vec::with_capacity(edits);
    let mut timeouts = 0;
    let mut edited = Vec::with_capacity(edits);
    let mut lcg: u64 = 0x2545_f491_4f6c_dd1d;
    for e in 0..edits {
        // Different WeightedServices, spread over the namespaces.
        let i = (e * (services / edits).max(1) + e % PER_NAMESPACE) % services;
        edited.push(i);
        let phase_no = 1 + e % 2;
        // An irregular pause (150 to 650 ms), so that edits land anywhere in the drift cycle.
        lcg = lcg.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        std::thread::sleep(Duration::from_millis(150 + (lcg >> 33) % 500));
        let (ns, name) = ws_id(i);
        let api: Api<WeightedService> = Api::namespaced(client.clone(), &ns);
        let want = target(vips[i], i, pods, phase_no);
        let sent = Instant::now();
        bed.block_on(api.patch(&name, &PatchParams::default(), &Patch::Merge(&json!({"spec": {"weights": weight_groups(phase_no)}}))))
            .with_context(|| format!("patching {ns}/{name}"))?;
        acked.push(ms(sent.elapsed()));
        match wait_for(&mut kernel, &want, Duration::from_secs(30))? {
            Some(done) => latencies.push(ms(done - sent)),
            None => {
                timeouts += 1;
                eprintln!("{}: edit {e} ({ns}/{name}) not in the kernel after 30 s", params.name);
            }
        }
    }
    let edit_writes = metric(bed, "ipvs_operator_netlink_writes_total", "kind=\"weight\"") - writes_before;
    let repairs = metric(bed, "ipvs_operator_drift_repairs_total", "") - repairs_before;
    phase(&format!("{edits} edits"), started);
    let rss_mib = status_kib(pid, "VmRSS:")? as f64 / 1024.0;
    if params.flag("SMAPS") {
        print_smaps(pid);
    }
    let peak_mib = status_kib(pid, "VmHWM:")? as f64 / 1024.0;
    // Heap and the like, and the pages of the binary (and libraries) it touched
    // (in the VM the binary is in the initramfs: shared memory, not a file).
    let anon_mib = status_kib(pid, "RssAnon:")? as f64 / 1024.0;
    let file_mib = (status_kib(pid, "RssFile:")? + status_kib(pid, "RssShmem:")?) as f64 / 1024.0;

    // Idle, with the drift loop on.
    std::thread::sleep(Duration::from_secs(5));
    let (pass_sum_before, pass_count_before) = passes(bed);
    let sweep_steps_before = sweep_steps(bed);
    let ticks_before = cpu_ticks(pid)?;
    let threads_before = thread_ticks(pid);
    let run_ns_before = run_ns(pid);
    let idle_started = Instant::now();
    std::thread::sleep(idle);
    let ticks = cpu_ticks(pid)? - ticks_before;
    let run_ns_idle = run_ns(pid).saturating_sub(run_ns_before);
    let idle_by_thread = thread_share(&threads_before, &thread_ticks(pid), idle_started.elapsed());
    let idle_elapsed = idle_started.elapsed();
    let (pass_sum_after, pass_count_after) = passes(bed);
    let sweep_steps_idle: Vec<f64> =
        sweep_steps(bed).iter().zip(&sweep_steps_before).map(|(after, before)| after - before).collect();
    let idle_cpu_percent = ticks as f64 / clock_ticks_per_second() as f64 / idle_elapsed.as_secs_f64() * 100.0;
    // The scheduler's own count: tick sampling misjudges a thread that runs
    // in short bursts, and the table reads below are timed the same way.
    let idle_run_percent = run_ns_idle as f64 / 1e9 / idle_elapsed.as_secs_f64() * 100.0;
    let idle_passes = pass_count_after - pass_count_before;
    let idle_pass_ms = if idle_passes > 0.0 { (pass_sum_after - pass_sum_before) / idle_passes * 1000.0 } else { f64::NAN };
    let rss_after_idle_mib = status_kib(pid, "VmRSS:")? as f64 / 1024.0;
    phase("idle", idle_started);

    let restart = if params.restart_edits > 0 { restart_phase(bed, params, &vips, &mut kernel, phase)? } else { Value::Null };
    let profile = if params.perf { profile_phase(bed, params, phase)? } else { Value::Null };
    let controller = if params.churn.is_zero() {
        Value::Null
    } else {
        // Reported, not fatal: the agent's numbers stand without it.
        controller_phase(bed, params, phase).unwrap_or_else(|error| {
            eprintln!("{}: the controller phase failed: {error:#}", params.name);
            bed.kill("controller");
            json!({"error": format!("{error:#}"), "statusWritesSoFar": status_writes(bed)})
        })
    };

    // The baseline: the agent stopped, the same weight changes written directly.
    if params.flag("AGENT_LOG") {
        eprintln!("agent log (tail):");
        let log = bed.log("agent");
        for line in log.lines().rev().take(80).collect::<Vec<_>>().into_iter().rev() {
            eprintln!("{line}");
        }
    }
    bed.kill("agent");
    let mut baseline = Vec::with_capacity(edits);
    let mut baseline_with_list = Vec::with_capacity(edits);
    for (e, &i) in edited.iter().enumerate() {
        for (with_list, samples) in [(false, &mut baseline), (true, &mut baseline_with_list)] {
            let phase_no = 3 + (e + usize::from(with_list)) % 2;
            let want = target(vips[i], i, pods, phase_no);
            let started = Instant::now();
            if with_list {
                // As the agent reads the table: the list of virtual services first.
                kernel.services()?;
            }
            let current = kernel.destinations(&want.key)?;
            let writes: Vec<Write> = current
                .iter()
                .filter_map(|d| {
                    let w = *want.want.get(&d.socket_addr())?;
                    Some(Write::set_weight(want.key, d, w as u16))
                })
                .collect();
            for result in kernel.apply(&writes) {
                result?;
            }
            if wait_for(&mut kernel, &want, Duration::from_secs(5))?.is_none() {
                bail!("the baseline's writes are not in the kernel");
            }
            samples.push(ms(started.elapsed()));
        }
    }

    // What a sweep must read at least: every virtual service and destination of
    // the table, with the ipvs crate (the idle CPU's floor at one sweep per
    // drift interval).
    let full_dump_ms = median_cpu_ms(|| kernel.dump().map(drop))?;
    // The same table as text, from /proc/net/ip_vs (the node's: this thread's namespace).
    let proc_read_ms =
        bed.node.enter(|| median_cpu_ms(|| std::fs::read_to_string("/proc/thread-self/net/ip_vs").map(drop)))?;
    // And as the agent's sweep reads it: the IPv4 table through getsockopt.
    let mut sockopt = bed.node.enter(ipvs::SockoptTable::new)?;
    let mut read_sockopt = || {
        sockopt.list_services()?;
        while !sockopt.read_destinations(usize::MAX)? {}
        Ok::<_, ipvs::IpvsError>(())
    };
    let sockopt_read_ms = median_cpu_ms(&mut read_sockopt)?;
    // The same read once per drift interval, as the idle agent does it: under
    // TCG a read after a pause costs more than one right after another.
    let sockopt_spaced_ms = median_cpu_ms(|| {
        std::thread::sleep(DRIFT_INTERVAL);
        read_sockopt()
    })?;
    // The idle agent's CPU against that floor, both as the scheduler counts them.
    let idle_cpu_ratio = idle_run_percent / (sockopt_spaced_ms / ms(DRIFT_INTERVAL) * 100.0);

    let sort = |v: &mut Vec<f64>| v.sort_by(f64::total_cmp);
    sort(&mut latencies);
    sort(&mut acked);
    sort(&mut baseline);
    sort(&mut baseline_with_list);
    let (p50, p99) = (percentile(&latencies, 50.0), percentile(&latencies, 99.0));
    let (b50, b99) = (percentile(&baseline, 50.0), percentile(&baseline, 99.0));
    let environment = if std::env::var_os("IPVS_TEST_VM").is_some() { "qemu-tcg" } else { "native" };
    let report = json!({
        "name": params.name,
        "what": format!(
            "edit of one WeightedService's weights via the API until the agent's writes are in the kernel (p50 over {edits} edits), \
             with {services} WeightedServices and {endpoints} endpoints; baseline: the same weight change written directly with \
             the ipvs crate (dump the destinations, write, read back)"
        ),
        "ours": round(p50),
        "baseline": round(b50),
        "unit": "ms",
        "ratio": round(p50 / b50),
        "n": latencies.len(),
        "p50Ms": round(p50),
        "p90Ms": round(percentile(&latencies, 90.0)),
        "p99Ms": round(p99),
        "maxMs": round(latencies.last().copied().unwrap_or(f64::NAN)),
        "rssMiB": round(rss_mib),
        "peakRssMiB": round(peak_mib),
        "rssAnonMiB": round(anon_mib),
        "rssFileMiB": round(file_mib),
        "rssAfterIdleMiB": round(rss_after_idle_mib),
        "rssAfterFirstSyncMiB": round(rss_start_mib),
        "idleCpuPercent": round(idle_cpu_percent),
        "idleSeconds": round(idle_elapsed.as_secs_f64()),
        "idlePasses": idle_passes,
        "idlePassMs": round(idle_pass_ms),
        "idleCpuPercentByThread": idle_by_thread,
        "restart": restart,
        "controller": controller,
        "profile": profile,
        "baselineP50Ms": round(b50),
        "baselineP99Ms": round(b99),
        "baselineWithServiceListP50Ms": round(percentile(&baseline_with_list, 50.0)),
        "baselineWithServiceListP99Ms": round(percentile(&baseline_with_list, 99.0)),
        "ratioP99": round(p99 / b99),
        "netlinkDumpMs": round(full_dump_ms),
        "netlinkDumpCpuPercent": round(full_dump_ms / ms(DRIFT_INTERVAL) * 100.0),
        "procReadMs": round(proc_read_ms),
        "procReadCpuPercent": round(proc_read_ms / ms(DRIFT_INTERVAL) * 100.0),
        "sockoptReadMs": round(sockopt_read_ms),
        "sockoptReadCpuPercent": round(sockopt_read_ms / ms(DRIFT_INTERVAL) * 100.0),
        "sockoptSpacedReadMs": round(sockopt_spaced_ms),
        "sockoptSpacedReadCpuPercent": round(sockopt_spaced_ms / ms(DRIFT_INTERVAL) * 100.0),
        // The idle agent against the bare read of the table it must do anyway
        // (both measured in this run): what its own work costs on top.
        "idleRunPercent": round(idle_run_percent),
        "idleCpuRatio": round(idle_cpu_ratio),
        // Where the idle agent's sweeps go, by its own count (thread CPU per
        // sweep, in ms): the read is comparable with sockoptSpacedReadMs.
        "idleSweeps": sweep_steps_idle[0],
        "idleSweepCpuMs": idle_sweep_cpu_ms(&sweep_steps_idle),
        "patchAckP50Ms": round(percentile(&acked, 50.0)),
        "edits": edits,
        "timeouts": timeouts,
        "weightWritesPerEdit": round(edit_writes / edits as f64),
        "driftRepairsDuringEdits": repairs,
        "weightedServices": services,
        "endpoints": endpoints,
        "destinationsPerService": pods,
        "initialConvergeMs": round(ms(initial_converge)),
        "emulatorSetupSeconds": round(emulator_seconds),
        "driftIntervalMs": DRIFT_INTERVAL.as_millis() as u64,
        "kubeProxySyncPeriodMs": PROXY_SYNC_PERIOD.as_millis() as u64,
        "environment": environment,
        "environmentNote": if environment == "qemu-tcg" {
            "QEMU with TCG (emulated CPU, roughly 10-20x slower than native, 2 vCPUs on a shared host): absolute times and CPU shares are inflated; compare with the baselines, measured in the same VM and kernel"
        } else {
            "native"
        },
        "goals": {"p99Ms": params.goals.0, "rssMiB": params.goals.1, "idleCpuPercent": params.goals.2, "idleCpuRatio": IDLE_CPU_RATIO_GOAL},
        "goalsMet": {
            "p99Ms": timeouts == 0 && p99 <= params.goals.0,
            "rssMiB": rss_mib <= params.goals.1,
            "idleCpuPercent": idle_cpu_percent <= params.goals.2,
            "idleCpuRatio": idle_cpu_ratio <= IDLE_CPU_RATIO_GOAL,
        },
        "runSeconds": round(run_started.elapsed().as_secs_f64()),
    });
    eprintln!(
        "{}: edit -> kernel p50 {p50:.1} ms, p99 {p99:.1} ms (baseline p50 {b50:.1} ms, p99 {b99:.1} ms); \
         agent RSS {rss_mib:.1} MiB, idle CPU {idle_cpu_percent:.2} % (ran {idle_run_percent:.2} %, \
         {idle_cpu_ratio:.2} × the table read; {idle_passes} passes of {idle_pass_ms:.1} ms)",
        params.name
    );
    Ok(report)
}

/// Nanoseconds the threads of a process have run, as the scheduler counts
/// them (`/proc/PID/task/TID/schedstat`'s first field).
fn run_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|stat| stat.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// CPU ticks of each thread of a process, summed by thread name.
fn thread_ticks(pid: u32) -> BTreeMap<String, u64> {
    let mut by_name = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return by_name };
    for task in tasks.flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")) else { continue };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        let name = stat[open + 1..close].to_string();
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let ticks = fields.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
            + fields.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
        *by_name.entry(name).or_insert(0) += ticks;
    }
    by_name
}

/// Percent of one core per thread name between two [`thread_ticks`].
fn thread_share(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>, elapsed: Duration) -> Value {
    let per_second = clock_ticks_per_second() as f64;
    let shares: serde_json::Map<String, Value> = after
        .iter()
        .map(|(name, ticks)| {
            let used = ticks.saturating_sub(before.get(name).copied().unwrap_or(0));
            (name.clone(), json!(round(used as f64 / per_second / elapsed.as_secs_f64() * 100.0)))
        })
        .collect();
    Value::Object(shares)
}

/// WeightedServices edited in the restart phase: others than the edits', spread out.
fn restart_targets(params: &Params) -> Vec<usize> {
    let stride = (params.services / params.restart_edits.max(1)).max(1);
    (0..params.restart_edits).map(|k| (k * stride + stride / 2 + 3) % params.services).collect()
}

/// The agent is killed, WeightedServices are edited while it is down, and it
/// starts again: until ready, until every edit is in the kernel, its writes.
fn restart_phase(
    bed: &mut Testbed,
    params: &Params,
    vips: &[IpAddr],
    kernel: &mut IpvsClient,
    phase: &dyn Fn(&str, Instant),
) -> Result<Value> {
    let started = Instant::now();
    bed.kill("agent");
    let client = bed.client();
    let targets = restart_targets(params);
    let phase_no = 3; // weights no earlier phase had
    for &i in &targets {
        let (ns, name) = ws_id(i);
        let api: Api<WeightedService> = Api::namespaced(client.clone(), &ns);
        bed.block_on(api.patch(&name, &PatchParams::default(), &Patch::Merge(&json!({"spec": {"weights": weight_groups(phase_no)}}))))
            .with_context(|| format!("patching {ns}/{name}"))?;
    }
    let mut pending: Vec<Target> = targets.iter().map(|&i| target(vips[i], i, params.pods, phase_no)).collect();
    let expected_writes = pending.iter().map(|t| t.want.len()).sum::<usize>();
    let restarted = Instant::now();
    bed.start_agent();
    let (mut ready_at, mut converged_at) = (None, None);
    let deadline = restarted + Duration::from_secs(1200);
    while ready_at.is_none() || converged_at.is_none() {
        if ready_at.is_none() && bed.agent_ready() {
            ready_at = Some(restarted.elapsed());
        }
        if converged_at.is_none() {
            let mut still = Vec::new();
            for t in pending {
                if !reached(kernel, &t)? {
                    still.push(t);
                }
            }
            pending = still;
            if pending.is_empty() {
                converged_at = Some(restarted.elapsed());
            }
        }
        if Instant::now() > deadline {
            bail!("after an agent restart: ready {ready_at:?}, {} edits not in the kernel after 20 minutes", pending.len());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Let its first sweep go by: it must find nothing to write.
    std::thread::sleep(DRIFT_INTERVAL * 2);
    let writes = metric(bed, "ipvs_operator_netlink_writes_total", "");
    let pid = agent_pid()?;
    let (ready, converged) = (ready_at.unwrap_or_default(), converged_at.unwrap_or_default());
    phase("the agent restart", started);
    eprintln!(
        "{}: restart: ready after {:.1} s, {} edits made while it was down in the kernel after {:.1} s, {writes} writes ({expected_writes} needed)",
        params.name,
        ready.as_secs_f64(),
        targets.len(),
        converged.as_secs_f64()
    );
    Ok(json!({
        "editsWhileDown": targets.len(),
        "readyMs": round(ms(ready)),
        "convergedMs": round(ms(converged)),
        "writes": writes,
        "writesNeeded": expected_writes,
        "rssMiB": round(status_kib(pid, "VmRSS:")? as f64 / 1024.0),
        "peakRssMiB": round(status_kib(pid, "VmHWM:")? as f64 / 1024.0),
    }))
}

/// The median CPU time (user and kernel) of this thread over nine runs of
/// `read`, in milliseconds.
fn median_cpu_ms<E>(mut read: impl FnMut() -> Result<(), E>) -> Result<f64, E> {
    let mut times = Vec::with_capacity(9);
    for _ in 0..9 {
        let started = thread_cpu_ms();
        read()?;
        times.push(thread_cpu_ms() - started);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// This thread's CPU time so far, in milliseconds.
fn thread_cpu_ms() -> f64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `t` is a valid timespec for the call to fill; the clock always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    t.tv_sec as f64 * 1e3 + t.tv_nsec as f64 / 1e6
}

/// Whether `perf` runs here (the VM has it when the runner added it).
fn perf_available() -> bool {
    std::process::Command::new("perf")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `perf record` attached to a process until [`Recording::stop`].
struct Recording {
    child: std::process::Child,
    data: std::path::PathBuf,
}

impl Recording {
    fn start(pid: u32, hz: u32, data: std::path::PathBuf) -> Result<Self> {
        let child = std::process::Command::new("perf")
            .args(["record", "-q", "-F", &hz.to_string(), "--call-graph", "dwarf,4096", "-p", &pid.to_string(), "-o"])
            .arg(&data)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .context("starting perf record")?;
        // Let it attach.
        std::thread::sleep(Duration::from_millis(500));
        Ok(Recording { child, data })
    }

    /// Stop recording; the flat (self) and inclusive (children) reports, as text.
    fn stop(mut self) -> Result<(String, String)> {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGINT);
        }
        self.child.wait()?;
        let report = |args: &[&str]| -> Result<String> {
            let out = std::process::Command::new("perf")
                .args(["report", "--stdio", "--sort", "symbol", "-g", "none", "-i"])
                .arg(&self.data)
                .args(args)
                .output()
                .context("perf report")?;
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        Ok((report(&["--no-children", "--percent-limit", "0.5"])?, report(&["--children", "--percent-limit", "2"])?))
    }
}

/// The lines of a perf report that hold a symbol's share, the first `n`.
fn top_lines(report: &str, n: usize) -> Vec<String> {
    report
        .lines()
        .filter(|l| l.trim_start().chars().next().is_some_and(|c| c.is_ascii_digit()))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .take(n)
        .collect()
}

/// Profiles of the agent: during an idle window with the drift loop on, and
/// from a restart (its first lists and pass) until ready.
fn profile_phase(bed: &mut Testbed, params: &Params, phase: &dyn Fn(&str, Instant)) -> Result<Value> {
    let started = Instant::now();
    let out = bench_dir();
    std::fs::create_dir_all(&out)?;
    let mut result = serde_json::Map::new();
    let mut save = |what: &str, flat: String, inclusive: String, seconds: f64| -> Result<()> {
        let file = out.join(format!("{}-profile-{what}.txt", params.name));
        std::fs::write(&file, format!("# self time\n{flat}\n# including callees\n{inclusive}"))?;
        result.insert(
            what.into(),
            json!({"seconds": round(seconds), "self": top_lines(&flat, 15), "inclusive": top_lines(&inclusive, 25), "file": file.file_name().map(|f| f.to_string_lossy().into_owned())}),
        );
        Ok(())
    };

    let window = params.idle.min(Duration::from_secs(20));
    // An idle agent runs about 1 % of the time: 99 Hz would give a few dozen samples.
    let recording = Recording::start(agent_pid()?, 997, std::env::temp_dir().join("idle.perf.data"))?;
    std::thread::sleep(window);
    let (flat, inclusive) = recording.stop()?;
    save("idle", flat, inclusive, window.as_secs_f64())?;

    bed.kill("agent");
    let restarted = Instant::now();
    bed.start_agent();
    let pid = wait_until(Duration::from_secs(10), "the agent's process", Duration::from_millis(2), || Ok(agent_pid().ok()))?;
    let recording = Recording::start(pid, 49, std::env::temp_dir().join("restart.perf.data"))?;
    wait_until(Duration::from_secs(1200), "the agent ready again", Duration::from_millis(100), || Ok(bed.agent_ready().then_some(())))?;
    let seconds = restarted.elapsed().as_secs_f64();
    let (flat, inclusive) = recording.stop()?;
    save("restart", flat, inclusive, seconds)?;
    phase("the profiles", started);
    Ok(Value::Object(result))
}

/// Whether a request is a write of a WeightedService's status.
fn is_status_write(r: &ipvs_operator_tests::apiserver::RequestRecord) -> bool {
    r.resource == "weightedservices" && r.subresource == "status" && matches!(r.verb.as_str(), "patch" | "update")
}

fn status_writes(bed: &Testbed) -> usize {
    bed.handle().requests().iter().filter(|r| is_status_write(r)).count()
}

/// The controller's writes of PodInfoSlices (applies and deletes).
fn pod_info_writes(bed: &Testbed) -> usize {
    let requests = bed.handle().requests();
    requests.iter().filter(|r| r.resource == "podinfoslices" && matches!(r.verb.as_str(), "patch" | "delete")).count()
}

/// The controller on the whole cluster, then pod label churn: its status writes per second.
fn controller_phase(bed: &mut Testbed, params: &Params, phase: &dyn Fn(&str, Instant)) -> Result<Value> {
    let started = Instant::now();
    bed.handle().clear_requests();
    bed.start_controller();
    // Settled: a status for every WeightedService, and no new writes for 10 s.
    let mut last = (0, Instant::now());
    wait_until(Duration::from_secs(900), "the controller's first statuses", Duration::from_secs(2), || {
        let writes = status_writes(bed);
        if writes != last.0 {
            last = (writes, Instant::now());
        }
        Ok((writes >= params.services && last.1.elapsed() >= Duration::from_secs(10)).then_some(writes))
    })?;
    let initial_writes = last.0;
    let initial_seconds = last.1.duration_since(started).as_secs_f64();
    // The PodInfoSlices loaded are what it publishes: it rewrites none.
    let initial_pod_info_writes = pod_info_writes(bed);
    if initial_pod_info_writes > 0 {
        eprintln!(
            "{}: the controller rewrote {initial_pod_info_writes} PodInfoSlices at start: the bench's disagree with its own",
            params.name
        );
    }
    phase("the controller's first statuses", started);

    // Churn: every 100 ms one pod's `env` label flips (prod <-> canary).
    let before = status_writes(bed);
    let pod_info_before = pod_info_writes(bed);
    let agent_writes_before = metric(bed, "ipvs_operator_netlink_writes_total", "kind=\"weight\"");
    let churn_started = Instant::now();
    let mut flipped: std::collections::HashSet<usize> = std::collections::HashSet::new();
    let mut touched: std::collections::HashSet<usize> = std::collections::HashSet::new();
    let mut lcg: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut changes = 0usize;
    let mut tick = churn_started;
    while churn_started.elapsed() < params.churn {
        lcg = lcg.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        let i = (lcg >> 33) as usize % params.services;
        let (ns, name) = ws_id(i);
        let env = if flipped.insert(i) {
            "canary"
        } else {
            flipped.remove(&i);
            "prod"
        };
        bed.handle().set_pod_label(&ns, &format!("{name}-0"), "env", Some(env)).context("flipping a label")?;
        touched.insert(i);
        changes += 1;
        tick += Duration::from_millis(100);
        if let Some(wait) = tick.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    let churn_elapsed = churn_started.elapsed();
    let during = status_writes(bed) - before;
    let pod_info_during = pod_info_writes(bed) - pod_info_before;
    // What the churn's last changes still cause.
    std::thread::sleep(Duration::from_secs(10));
    let after = status_writes(bed) - before;
    let agent_writes = metric(bed, "ipvs_operator_netlink_writes_total", "kind=\"weight\"") - agent_writes_before;
    bed.kill("controller");
    let rate = during as f64 / churn_elapsed.as_secs_f64();
    phase("the controller under churn", churn_started);
    eprintln!(
        "{}: controller: {initial_writes} status writes in {initial_seconds:.1} s at start; under churn ({:.1} label flips/s on {} WeightedServices) {rate:.2} status writes/s, {:.2} PodInfoSlice writes/s",
        params.name,
        changes as f64 / churn_elapsed.as_secs_f64(),
        touched.len(),
        pod_info_during as f64 / churn_elapsed.as_secs_f64()
    );
    Ok(json!({
        "initialStatusWrites": initial_writes,
        "initialPodInfoSliceWrites": initial_pod_info_writes,
        "initialSeconds": round(initial_seconds),
        "churnSeconds": round(churn_elapsed.as_secs_f64()),
        "churnChanges": changes,
        "churnChangesPerSecond": round(changes as f64 / churn_elapsed.as_secs_f64()),
        "churnWeightedServicesTouched": touched.len(),
        "statusWritesDuringChurn": during,
        "statusWritesPerSecond": round(rate),
        "statusWritesPerChange": round(during as f64 / changes.max(1) as f64),
        "statusWritesIncludingTail10s": after,
        // Each flip changes one pod's labels: one slice rewritten (agents see it there).
        "podInfoSliceWritesDuringChurn": pod_info_during,
        "agentWeightWritesDuringChurn": agent_writes,
    }))
}
