//! Churn soak (issue 8), on a real kernel's IPVS in the test VM: for
//! `SOAK_CHURN_SECONDS` (default 600), every 100 ms a pod is created or
//! deleted, or a pod's `env` label flips, across 50 WeightedServices, and every
//! 30 s (`SOAK_CHURN_RELOAD_SECONDS`; 0: never) their policy module is
//! replaced in the agent's `--policy-dir` (the
//! same label-selector component, alternately with and without a custom
//! section: another sha256, so a real reload and re-evaluation of all 50).
//! Real agent, controller and kube-proxy emulator; pods have no backends
//! (weights need none).
//!
//! Checked:
//! - the agent's resident memory does not grow after warm-up (the first fifth
//!   of the run, at least 30 s): the mean of the last three samples (every 5 s)
//!   is within 10 % (at least 4 MiB) of the mean of the three after warm-up;
//! - every kernel sample is consistent: the `consistency` sampler reads the
//!   table every 100 ms and no ready endpoint is ever at weight 0 (these
//!   policies never give 0); after the churn, every WeightedService's kernel
//!   weights equal what `ipvs-operator eval` computes from the same objects.
//!
//! Reported (stdout and `target/soak/churn.json`): the agent's netlink writes
//! per second, and how long each change took to reach the kernel — from the
//! API server's change until the kernel shows the weight the change calls for
//! on the pod's destination (a new pod: kube-proxy adds it, then the agent
//! weights it; a label flip: the agent rewrites it), read with netlink every
//! 20 ms: p50, p99 and the largest. `make soak-churn` runs it in the VM.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ipvs::{IpvsClient, ServiceKey};
use ipvs_operator::policy::BUILTIN_POLICIES;
use ipvs_operator_tests::apiserver::Grace;
use ipvs_operator_tests::consistency::{wait_for_kernel_to_match_eval, Sampler, SamplerConfig};
use ipvs_operator_tests::testbed::{wait_until, Testbed, TestbedConfig, NODE_NAME};
use serde_json::{json, Value};

const NAMESPACES: usize = 5;
const PER_NAMESPACE: usize = 10;
const INITIAL_PODS: usize = 6;
const MIN_PODS: usize = 2;
const MAX_PODS: usize = 12;
const TICK: Duration = Duration::from_millis(100);
const RSS_EVERY: Duration = Duration::from_secs(5);
/// The weights of the groups: neither is kube-proxy's 1, so every change shows.
const PROD: u32 = 5;
const CANARY: u32 = 2;

fn env_seconds(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn ws_id(i: usize) -> (String, String) {
    (format!("soak-{}", i / PER_NAMESPACE), format!("ws-{i:02}"))
}

fn weighted_service(i: usize) -> String {
    let (ns, name) = ws_id(i);
    json!({
        "apiVersion": "codesink.net/v1alpha1", "kind": "WeightedService",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "selector": {"app": name},
            "ports": [{"protocol": "TCP", "port": 80, "targetPort": "www"}],
            "scheduler": "wrr",
            "weights": [{"weight": PROD, "selector": {"env": "prod"}}, {"weight": CANARY, "selector": {"env": "canary"}}],
            "policy": {"name": "soak"},
        }
    })
    .to_string()
}

fn pod(i: usize, pod: &str, env: &str, ip: IpAddr) -> String {
    let (ns, name) = ws_id(i);
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": pod, "namespace": ns,
            "labels": {"app": name, "env": env},
            "annotations": {"test-apiserver.codesink.net/pod-ip": ip.to_string()},
        },
        "spec": {
            "nodeName": NODE_NAME,
            "containers": [{"name": "web", "image": "web", "ports": [{"containerPort": 8080, "name": "www"}]}],
        }
    })
    .to_string()
}

/// Addresses are never reused during a run: every pod is new to the agent.
fn nth_ip(n: usize) -> IpAddr {
    IpAddr::from([10, 244 + (n / 62_500) as u8 % 8, (n / 250 % 250) as u8, (n % 250 + 2) as u8])
}

/// The label-selector component, and the same with a custom section (another sha256).
fn modules() -> (Vec<u8>, Vec<u8>) {
    let base = BUILTIN_POLICIES.iter().find(|(n, _)| *n == "label-selector").expect("label-selector is built in").1.to_vec();
    let mut other = base.clone();
    let (name, payload) = (b"ipvs-operator-soak", b"another sha256, the same policy");
    let body_len = 1 + name.len() + payload.len();
    other.push(0); // a custom section
    let mut n = body_len;
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        other.push(if n == 0 { byte } else { byte | 0x80 });
        if n == 0 {
            break;
        }
    }
    other.push(name.len() as u8);
    other.extend_from_slice(name);
    other.extend_from_slice(payload);
    (base, other)
}

/// Replace `soak.wasm` in the directory atomically (a rename, as a file in a
/// ConfigMap volume changes).
fn install_module(dir: &std::path::Path, bytes: &[u8]) {
    let tmp = dir.join(".soak.wasm.tmp");
    std::fs::write(&tmp, bytes).expect("writing the module");
    std::fs::rename(&tmp, dir.join("soak.wasm")).expect("installing the module");
}

/// The agent's PID (the process whose command line is `…/ipvs-operator agent …`).
fn agent_pid() -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        (args.len() > 1 && args[0].ends_with(b"/ipvs-operator") && args[1] == b"agent").then_some(pid)
    })
}

fn rss_kib(pid: u32) -> Option<u64> {
    ipvs_operator_tests::procstat::status_kib(pid, "VmRSS:").ok()
}

/// A change waiting to reach the kernel: the destination and the weight it must show.
struct Pending {
    since: Instant,
    /// A new pod (kube-proxy adds its destination, then the agent weights it), or a label flip.
    created: bool,
    service: ServiceKey,
    weight: u32,
}

/// Reads the kernel every 20 ms and times each pending change until its weight is there.
struct Tracker {
    pending: Arc<Mutex<HashMap<SocketAddr, Pending>>>,
    latencies: Arc<Mutex<Vec<(Duration, bool)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Tracker {
    fn start(mut client: IpvsClient) -> Tracker {
        let pending: Arc<Mutex<HashMap<SocketAddr, Pending>>> = Arc::default();
        let latencies: Arc<Mutex<Vec<(Duration, bool)>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (pending, latencies, stop) = (pending.clone(), latencies.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let keys: Vec<ServiceKey> = pending.lock().unwrap().values().map(|p| p.service).collect();
                    let mut seen: HashMap<(ServiceKey, SocketAddr), u32> = HashMap::new();
                    for key in keys.into_iter().collect::<std::collections::BTreeSet<_>>() {
                        if let Ok(destinations) = client.destinations(&key) {
                            seen.extend(destinations.iter().map(|d| ((key, d.socket_addr()), d.weight)));
                        }
                    }
                    let read = Instant::now();
                    let mut pending = pending.lock().unwrap();
                    let done: Vec<SocketAddr> = pending
                        .iter()
                        .filter(|(address, p)| seen.get(&(p.service, **address)) == Some(&p.weight))
                        .map(|(address, _)| *address)
                        .collect();
                    let mut latencies = latencies.lock().unwrap();
                    for address in done {
                        let p = pending.remove(&address).expect("pending");
                        latencies.push((read.saturating_duration_since(p.since), p.created));
                    }
                    drop((pending, latencies));
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        Tracker { pending, latencies, stop, thread: Some(thread) }
    }

    /// A change was made at `since`: `address` must show `weight` on `service`.
    /// A change still pending for the same address is superseded (true).
    fn expect(&self, address: SocketAddr, service: ServiceKey, weight: u32, created: bool, since: Instant) -> bool {
        self.pending.lock().unwrap().insert(address, Pending { since, created, service, weight }).is_some()
    }

    fn forget(&self, address: &SocketAddr) -> bool {
        self.pending.lock().unwrap().remove(address).is_some()
    }

    /// Stop; the latencies, and the changes still pending with how long they have waited.
    fn finish(mut self) -> (Vec<(Duration, bool)>, Vec<Duration>) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("the tracker thread");
        }
        let waiting = self.pending.lock().unwrap().values().map(|p| p.since.elapsed()).collect();
        (std::mem::take(&mut *self.latencies.lock().unwrap()), waiting)
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1].as_secs_f64() * 1000.0
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn mean_mib(samples: &[(f64, u64)]) -> f64 {
    samples.iter().map(|(_, kib)| *kib as f64 / 1024.0).sum::<f64>() / samples.len().max(1) as f64
}

#[test]
fn churn_soak() {
    let seconds = env_seconds("SOAK_CHURN_SECONDS", 600);
    // Between two replacements of the policy module (0: never).
    let reload_every = Duration::from_secs(env_seconds("SOAK_CHURN_RELOAD_SECONDS", 30));
    let duration = Duration::from_secs(seconds);
    let warm_up = Duration::from_secs((seconds / 5).max(30));
    assert!(duration > warm_up + RSS_EVERY * 6, "SOAK_CHURN_SECONDS={seconds} leaves no time after the warm-up ({warm_up:?})");
    let services = NAMESPACES * PER_NAMESPACE;

    let policies = tempfile::Builder::new().prefix("soak-policies-").tempdir().expect("a temp dir");
    let (module_a, module_b) = modules();
    install_module(policies.path(), &module_a);
    let mut bed = Testbed::new(TestbedConfig {
        proxy_scheduler: "wrr".into(),
        policy_dir: Some(policies.path().to_path_buf()),
        // As the policy e2e tests: the emulated CPU runs policies slowly.
        policy_timeout: Some(Duration::from_millis(500)),
        ..TestbedConfig::default()
    });

    // 50 WeightedServices of 6 pods (5 prod, 1 canary).
    let mut next_ip = 0usize;
    let mut next_pod = 0usize;
    // Per WeightedService: pod name → (address, env).
    let mut pods: Vec<BTreeMap<String, (IpAddr, String)>> = vec![BTreeMap::new(); services];
    let mut manifests = Vec::new();
    for (i, ws_pods) in pods.iter_mut().enumerate() {
        manifests.push(weighted_service(i));
        for k in 0..INITIAL_PODS {
            let env = if k == 0 { "canary" } else { "prod" };
            let name = format!("{}-{next_pod}", ws_id(i).1);
            next_pod += 1;
            let ip = nth_ip(next_ip);
            next_ip += 1;
            manifests.push(pod(i, &name, env, ip));
            ws_pods.insert(name, (ip, env.to_string()));
        }
    }
    bed.handle()
        .load_manifests(&format!("{{\"apiVersion\":\"v1\",\"kind\":\"List\",\"items\":[{}]}}", manifests.join(",")))
        .expect("the WeightedServices and pods load");
    bed.start_all();
    let vips: Vec<IpAddr> = (0..services).map(|i| {
        let (ns, name) = ws_id(i);
        bed.cluster_ip(&ns, &name)
    }).collect();
    let key = |i: usize| ServiceKey::tcp(SocketAddr::new(vips[i], 80));
    let weight_of = |env: &str| if env == "prod" { PROD } else { CANARY };

    // Everything converged before the churn starts.
    let setup = Instant::now();
    for i in 0..services {
        let (ns, name) = ws_id(i);
        wait_for_kernel_to_match_eval(&bed, &ns, &name, Duration::from_secs(300));
    }
    eprintln!("soak: {services} WeightedServices converged in {:.1} s; churning for {seconds} s", setup.elapsed().as_secs_f64());

    let sampler = Sampler::start(&bed, SamplerConfig::default());
    let tracker = Tracker::start(bed.node.enter(IpvsClient::new).expect("IPVS in the node"));
    let writes_before = bed.agent_metric("ipvs_operator_netlink_writes_total", "").unwrap_or(0.0);
    let evaluations_before = bed.agent_metric("ipvs_operator_policy_evaluations_total", "").unwrap_or(0.0);
    let pid = agent_pid().expect("the agent runs");
    let mut rss: Vec<(f64, u64)> = Vec::new();
    let (mut created, mut deleted, mut flipped, mut reloads, mut superseded) = (0usize, 0usize, 0usize, 0usize, 0usize);
    let mut lcg: u64 = 0x2545_f491_4f6c_dd1d;
    let mut random = move |n: usize| {
        lcg = lcg.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (lcg >> 33) as usize % n
    };
    let started = Instant::now();
    let (mut next_tick, mut next_reload, mut next_rss) = (started, started + reload_every, started);
    while started.elapsed() < duration {
        let now = Instant::now();
        if now >= next_rss {
            next_rss += RSS_EVERY;
            rss.push((started.elapsed().as_secs_f64(), rss_kib(pid).expect("the agent is still running")));
        }
        if !reload_every.is_zero() && now >= next_reload {
            next_reload += reload_every;
            reloads += 1;
            install_module(policies.path(), if reloads % 2 == 1 { &module_b } else { &module_a });
        }
        let i = random(services);
        let (ns, _) = ws_id(i);
        let count = pods[i].len();
        let op = random(10);
        if (op < 4 && count < MAX_PODS) || count <= MIN_PODS {
            let env = if random(3) == 0 { "canary" } else { "prod" };
            let name = format!("{}-{next_pod}", ws_id(i).1);
            next_pod += 1;
            let ip = nth_ip(next_ip);
            next_ip += 1;
            bed.handle().load_manifests(&pod(i, &name, env, ip)).expect("a pod is created");
            superseded += usize::from(tracker.expect(SocketAddr::new(ip, 8080), key(i), weight_of(env), true, Instant::now()));
            pods[i].insert(name, (ip, env.to_string()));
            created += 1;
        } else if op < 8 {
            let name = pods[i].keys().nth(random(count)).expect("a pod").clone();
            let (ip, _) = pods[i].remove(&name).expect("the pod");
            // Half go at once, half terminate for a second first (kube-proxy drains them).
            let grace = if random(2) == 0 { Grace::Immediate } else { Grace::For(Duration::from_secs(1)) };
            bed.handle().delete_pod(&ns, &name, grace).expect("a pod is deleted");
            superseded += usize::from(tracker.forget(&SocketAddr::new(ip, 8080)));
            deleted += 1;
        } else {
            let name = pods[i].keys().nth(random(count)).expect("a pod").clone();
            let entry = pods[i].get_mut(&name).expect("the pod");
            let env = if entry.1 == "prod" { "canary" } else { "prod" };
            bed.handle().set_pod_label(&ns, &name, "env", Some(env)).expect("a label flips");
            superseded += usize::from(tracker.expect(SocketAddr::new(entry.0, 8080), key(i), weight_of(env), false, Instant::now()));
            entry.1 = env.to_string();
            flipped += 1;
        }
        next_tick += TICK;
        if let Some(wait) = next_tick.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    let churn = started.elapsed();
    let writes = bed.agent_metric("ipvs_operator_netlink_writes_total", "").unwrap_or(0.0) - writes_before;
    let evaluations = bed.agent_metric("ipvs_operator_policy_evaluations_total", "").unwrap_or(0.0) - evaluations_before;
    // The last changes: let them land, then stop timing.
    wait_until(Duration::from_secs(60), "the last changes in the kernel", || {
        tracker.pending.lock().unwrap().is_empty().then_some(())
    });
    let (timed, still_pending) = tracker.finish();
    let samples = sampler.finish();
    eprintln!("soak: {}", samples.summary());
    rss.push((started.elapsed().as_secs_f64(), rss_kib(pid).expect("the agent is still running")));

    // After the churn, every WeightedService as `ipvs-operator eval` computes it.
    for i in 0..services {
        let (ns, name) = ws_id(i);
        wait_for_kernel_to_match_eval(&bed, &ns, &name, Duration::from_secs(120));
    }

    let sorted = |created: Option<bool>| {
        let mut v: Vec<Duration> = timed.iter().filter(|(_, c)| created.is_none_or(|w| *c == w)).map(|(d, _)| *d).collect();
        v.sort();
        v
    };
    let latencies = sorted(None);
    let stats = |v: &[Duration]| {
        json!({"n": v.len(), "p50Ms": round2(percentile(v, 50.0)), "p99Ms": round2(percentile(v, 99.0)),
               "maxMs": round2(v.last().map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0))})
    };
    let after_warm_up: Vec<(f64, u64)> = rss.iter().copied().filter(|(t, _)| *t >= warm_up.as_secs_f64()).collect();
    let warm = mean_mib(&after_warm_up[..3.min(after_warm_up.len())]);
    let end = mean_mib(&rss[rss.len().saturating_sub(3)..]);
    let tolerance = (warm * 0.10).max(4.0);
    // Least-squares slope after warm-up, MiB per hour.
    let slope = {
        let n = after_warm_up.len() as f64;
        let (mx, my) = (
            after_warm_up.iter().map(|(t, _)| t).sum::<f64>() / n,
            after_warm_up.iter().map(|(_, k)| *k as f64 / 1024.0).sum::<f64>() / n,
        );
        let cov: f64 = after_warm_up.iter().map(|(t, k)| (t - mx) * (*k as f64 / 1024.0 - my)).sum();
        let var: f64 = after_warm_up.iter().map(|(t, _)| (t - mx).powi(2)).sum();
        if var > 0.0 { cov / var * 3600.0 } else { 0.0 }
    };
    let round = round2;
    let largest = latencies.last().map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0);
    let report = json!({
        "name": "churn",
        "seconds": round(churn.as_secs_f64()),
        "weightedServices": services,
        "changes": {"created": created, "deleted": deleted, "labelFlips": flipped, "policyReloads": reloads, "reloadEverySeconds": reload_every.as_secs(),
                    "perSecond": round((created + deleted + flipped) as f64 / churn.as_secs_f64())},
        "writesPerSecond": round(writes / churn.as_secs_f64()),
        "writes": writes,
        "evaluations": evaluations,
        "changeToKernel": {
            "timed": latencies.len(),
            "superseded": superseded,
            "p50Ms": round(percentile(&latencies, 50.0)),
            "p99Ms": round(percentile(&latencies, 99.0)),
            "maxMs": round(largest),
            "resolutionMs": 20,
            "neverArrived": still_pending.len(),
            "newPods": stats(&sorted(Some(true))),
            "labelFlips": stats(&sorted(Some(false))),
        },
        "rss": {
            "warmUpSeconds": warm_up.as_secs(),
            "afterWarmUpMiB": round(warm),
            "endMiB": round(end),
            "peakMiB": round(rss.iter().map(|(_, k)| *k as f64 / 1024.0).fold(0.0, f64::max)),
            "toleranceMiB": round(tolerance),
            "slopeMiBPerHour": round(slope),
            "samples": rss.iter().map(|(t, k)| json!([round(*t), round(*k as f64 / 1024.0)])).collect::<Vec<Value>>(),
        },
        "consistency": {
            "kernelReads": samples.samples,
            "destinationsChecked": samples.destinations_checked,
            "longestGapMs": samples.longest_gap.as_millis() as u64,
            "violations": samples.violations.len(),
            "readErrors": samples.errors.len(),
            "allMatchEvalAfter": true,
        },
        "environment": if std::env::var_os("IPVS_TEST_VM").is_some() { "qemu-tcg" } else { "native" },
    });
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/soak");
    std::fs::create_dir_all(&out).expect("target/soak");
    std::fs::write(out.join("churn.json"), serde_json::to_string_pretty(&report).expect("JSON") + "\n").expect("churn.json");
    println!("{}", serde_json::to_string_pretty(&report).expect("JSON"));
    eprintln!(
        "soak: {} changes in {:.0} s, {:.1} writes/s; change -> kernel p50 {:.0} ms, p99 {:.0} ms, largest {largest:.0} ms; agent RSS {warm:.1} MiB after warm-up, {end:.1} MiB at the end",
        created + deleted + flipped,
        churn.as_secs_f64(),
        writes / churn.as_secs_f64(),
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0),
    );

    samples.assert_clean();
    assert!(still_pending.is_empty(), "{} changes never reached the kernel", still_pending.len());
    assert!(
        end <= warm + tolerance,
        "the agent's resident memory grew after warm-up: {warm:.1} MiB -> {end:.1} MiB (tolerance {tolerance:.1} MiB; {slope:.1} MiB/h)"
    );
}
