//! Convergence of the real agent at scale, on a real kernel's IPVS (in the test
//! VM): `CONVERGENCE_SERVICES` WeightedServices (default 1,000) of
//! `CONVERGENCE_PODS` pods each (default 10: 10,000 endpoints) in the test API
//! server, their Services (as the controller creates them: owned, labelled),
//! the kube-proxy emulator programming the virtual services and destinations
//! (scheduler wrr, as the README advises), and one `ipvs-operator agent` with
//! its default drift interval (2 s).
//!
//! Measured:
//! - edit → kernel: a WeightedService's weights are changed with a merge patch
//!   through the API; the time from sending the patch until the kernel has the
//!   new weight on every destination of its virtual service (read with our
//!   netlink client every millisecond), over `CONVERGENCE_EDITS` edits
//!   (default 100) of different WeightedServices, at irregular intervals so
//!   that they land anywhere in the drift loop's cycle: p50 and p99;
//! - the agent's resident memory (VmRSS) after the edits;
//! - its CPU while idle with the drift loop on (utime + stime over
//!   `CONVERGENCE_IDLE_SECONDS`, default 30), as percent of one core.
//!
//! Baseline, in the same run and kernel, once the agent is stopped: the same
//! weight changes on the same virtual services written directly with the ipvs
//! crate (dump the service's destinations, write the new weights, read them
//! back): the kernel's share of an edit, which no agent can beat. The agent's
//! time above it is the watch, the pass and the policy evaluation.
//!
//! For idle CPU, the floor of a periodic comparison is what reading the table
//! costs: the same run measures one netlink dump of the whole table with the
//! ipvs crate (one request per virtual service) and one read of
//! `/proc/net/ip_vs` (the agent's sweep reads that, and netlink only for what
//! differs), each as a share of one core at one read per drift interval.
//!
//! No controller runs (the Services it would create are loaded directly) and
//! pods have no network-namespace backends (weights need none): the CPU is the
//! agent's. Writes `target/bench/convergence.json`. `make bench-convergence`
//! runs it in the test VM; `CONVERGENCE_AGENT_LOG=1` prints the agent's log
//! and `CONVERGENCE_SMAPS=1` its largest mappings.

#![recursion_limit = "256"]

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ipvs::{IpvsClient, ServiceKey, Write};
use ipvs_operator::crd::WeightedService;
use ipvs_operator_tests::testbed::{Testbed, TestbedConfig, NODE_NAME};
use kube::api::{Api, Patch, PatchParams};
use serde_json::{json, Value};

/// The goals.
const GOAL_P99_MS: f64 = 100.0;
const GOAL_RSS_MIB: f64 = 64.0;
const GOAL_IDLE_CPU_PERCENT: f64 = 1.0;

/// The agent's default drift interval.
const DRIFT_INTERVAL: Duration = Duration::from_secs(2);
/// kube-proxy's default sync period.
const PROXY_SYNC_PERIOD: Duration = Duration::from_secs(30);

/// WeightedServices per namespace: the test API server's built-in controllers
/// work per namespace, so a namespace of 10,000 pods would make every change
/// cost it seconds under the VM's emulated CPU.
const PER_NAMESPACE: usize = 10;

fn env_number(name: &str, default: usize) -> Result<usize> {
    match std::env::var(name) {
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

/// CPU time (user + system) of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("/proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat: 12 and 13 after the name and state.
    let utime: u64 = fields.get(11).context("utime")?.parse()?;
    let stime: u64 = fields.get(12).context("stime")?.parse()?;
    Ok(utime + stime)
}

/// A `/proc/PID/status` value in KiB (VmRSS, VmHWM).
fn status_kib(pid: u32, key: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with(key)).with_context(|| format!("{key} in /proc/{pid}/status"))?;
    Ok(line.split_whitespace().nth(1).context("a number")?.parse()?)
}

fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as u64 } else { 100 }
}

fn metric(bed: &Testbed, name: &str, labels: &str) -> f64 {
    bed.agent_metric(name, labels).unwrap_or(0.0)
}

/// Sum and count of the agent's pass-time histogram.
fn passes(bed: &Testbed) -> (f64, f64) {
    (metric(bed, "ipvs_operator_reconcile_seconds_sum", ""), metric(bed, "ipvs_operator_reconcile_seconds_count", ""))
}

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

fn main() -> Result<()> {
    // `cargo bench` passes --bench; nothing else to parse.
    let services = env_number("CONVERGENCE_SERVICES", 1000)?;
    let pods = env_number("CONVERGENCE_PODS", 10)?.max(2);
    let edits = env_number("CONVERGENCE_EDITS", 100)?.min(services);
    let idle = Duration::from_secs(env_number("CONVERGENCE_IDLE_SECONDS", 30)? as u64);
    let endpoints = services * pods;
    let run_started = Instant::now();
    let phase = |what: &str, since: Instant| eprintln!("convergence: {what} in {:.1} s", since.elapsed().as_secs_f64());

    let mut bed = Testbed::new(TestbedConfig {
        drift_interval: DRIFT_INTERVAL,
        proxy_scheduler: "wrr".into(),
        proxy_sync_period: PROXY_SYNC_PERIOD,
        ..TestbedConfig::default()
    });
    let result = run(&mut bed, services, pods, edits, idle, endpoints, run_started, &phase);
    if result.is_err() {
        eprintln!("testbed logs (tail):");
        for line in bed.logs().lines().rev().take(60).collect::<Vec<_>>().into_iter().rev() {
            eprintln!("{line}");
        }
    }
    let report = result?;
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("convergence.json"), serde_json::to_string_pretty(&report)? + "\n")?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run(
    bed: &mut Testbed,
    services: usize,
    pods: usize,
    edits: usize,
    idle: Duration,
    endpoints: usize,
    run_started: Instant,
    phase: &dyn Fn(&str, Instant),
) -> Result<Value> {
    // The cluster, without backends: loaded into the API server directly.
    let started = Instant::now();
    bed.handle().load_manifests(&cluster(services, pods)).context("loading the WeightedServices and pods")?;
    bed.handle().load_manifests(&services_manifest(bed)).context("loading the Services")?;
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
    phase(&format!("loaded {services} WeightedServices, Services and {endpoints} pods"), started);

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
                eprintln!("convergence: edit {e} ({ns}/{name}) not in the kernel after 30 s");
            }
        }
    }
    let edit_writes = metric(bed, "ipvs_operator_netlink_writes_total", "kind=\"weight\"") - writes_before;
    let repairs = metric(bed, "ipvs_operator_drift_repairs_total", "") - repairs_before;
    phase(&format!("{edits} edits"), started);
    let rss_mib = status_kib(pid, "VmRSS:")? as f64 / 1024.0;
    if std::env::var_os("CONVERGENCE_SMAPS").is_some() {
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
    let ticks_before = cpu_ticks(pid)?;
    let idle_started = Instant::now();
    std::thread::sleep(idle);
    let ticks = cpu_ticks(pid)? - ticks_before;
    let idle_elapsed = idle_started.elapsed();
    let (pass_sum_after, pass_count_after) = passes(bed);
    let idle_cpu_percent = ticks as f64 / clock_ticks_per_second() as f64 / idle_elapsed.as_secs_f64() * 100.0;
    let idle_passes = pass_count_after - pass_count_before;
    let idle_pass_ms = if idle_passes > 0.0 { (pass_sum_after - pass_sum_before) / idle_passes * 1000.0 } else { f64::NAN };
    let rss_after_idle_mib = status_kib(pid, "VmRSS:")? as f64 / 1024.0;
    phase("idle", idle_started);

    // The baseline: the agent stopped, the same weight changes written directly.
    if std::env::var_os("CONVERGENCE_AGENT_LOG").is_some() {
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
    let mut dumps: Vec<f64> = (0..3)
        .map(|_| {
            let started = Instant::now();
            kernel.dump().map(|_| ms(started.elapsed()))
        })
        .collect::<Result<_, _>>()?;
    dumps.sort_by(f64::total_cmp);
    let full_dump_ms = dumps[1];
    // The same table as text, from /proc/net/ip_vs (the node's: this thread's namespace).
    let mut proc_reads: Vec<f64> = (0..3)
        .map(|_| {
            bed.node.enter(|| {
                let started = Instant::now();
                std::fs::read_to_string("/proc/thread-self/net/ip_vs").map(|_| ms(started.elapsed()))
            })
        })
        .collect::<Result<_, _>>()?;
    proc_reads.sort_by(f64::total_cmp);
    let proc_read_ms = proc_reads[1];

    let sort = |v: &mut Vec<f64>| v.sort_by(f64::total_cmp);
    sort(&mut latencies);
    sort(&mut acked);
    sort(&mut baseline);
    sort(&mut baseline_with_list);
    let (p50, p99) = (percentile(&latencies, 50.0), percentile(&latencies, 99.0));
    let (b50, b99) = (percentile(&baseline, 50.0), percentile(&baseline, 99.0));
    let environment = if std::env::var_os("IPVS_TEST_VM").is_some() { "qemu-tcg" } else { "native" };
    let report = json!({
        "name": "convergence",
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
        "baselineP50Ms": round(b50),
        "baselineP99Ms": round(b99),
        "baselineWithServiceListP50Ms": round(percentile(&baseline_with_list, 50.0)),
        "baselineWithServiceListP99Ms": round(percentile(&baseline_with_list, 99.0)),
        "ratioP99": round(p99 / b99),
        "netlinkDumpMs": round(full_dump_ms),
        "netlinkDumpCpuPercent": round(full_dump_ms / ms(DRIFT_INTERVAL) * 100.0),
        "procReadMs": round(proc_read_ms),
        "procReadCpuPercent": round(proc_read_ms / ms(DRIFT_INTERVAL) * 100.0),
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
        "goals": {"p99Ms": GOAL_P99_MS, "rssMiB": GOAL_RSS_MIB, "idleCpuPercent": GOAL_IDLE_CPU_PERCENT},
        "goalsMet": {
            "p99Ms": timeouts == 0 && p99 <= GOAL_P99_MS,
            "rssMiB": rss_mib <= GOAL_RSS_MIB,
            "idleCpuPercent": idle_cpu_percent <= GOAL_IDLE_CPU_PERCENT,
        },
        "runSeconds": round(run_started.elapsed().as_secs_f64()),
    });
    eprintln!(
        "convergence: edit -> kernel p50 {p50:.1} ms, p99 {p99:.1} ms (baseline p50 {b50:.1} ms, p99 {b99:.1} ms); \
         agent RSS {rss_mib:.1} MiB, idle CPU {idle_cpu_percent:.2} % ({idle_passes} passes of {idle_pass_ms:.1} ms)"
    );
    Ok(report)
}
