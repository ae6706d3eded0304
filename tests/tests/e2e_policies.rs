//! End to end for the policy library (issue 6), on a real kernel's IPVS in the
//! test VM: each built-in policy's example WeightedService measured on real
//! connections, a gradual rollout seen stepping, and policy modules in a
//! directory laid out as the kubelet mounts a ConfigMap — hot reloaded, a
//! broken one refused — and a sha256 pin that does not match.
//!
//! `make test-kernel` runs this in the VM (tests/vm). Each test builds its own
//! testbed (namespaces, IPVS table, API server, controller, agent), so they run
//! side by side. Splits are checked against what the policy should give, within
//! 2 percentage points.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use ipvs_operator::crd::WeightedService;
use ipvs_operator::policy::embedded_module;
use ipvs_operator_tests::apiserver::PodUpdate;
use ipvs_operator_tests::testbed::{pod_manifest, wait_until, Testbed, TestbedConfig};
use jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::{json, Value};

const TIMEOUT: Duration = Duration::from_secs(120);

/// A testbed whose kube-proxy uses `scheduler`, the one the WeightedServices ask
/// for: its syncs then never swap the kernel's scheduler under the connections.
///
/// Policies get 500 ms instead of 50: the VM's emulated CPU runs them tens of
/// times slower than a real one, and with every test's testbed on its two CPUs
/// (compiling policies at times) an evaluation can wait for a CPU longer than
/// 50 ms. A timed-out evaluation is retried only after 30 s, which would make a
/// rollout step late by as much.
fn config(scheduler: &str) -> TestbedConfig {
    TestbedConfig {
        proxy_scheduler: scheduler.into(),
        policy_timeout: Some(Duration::from_millis(500)),
        ..TestbedConfig::default()
    }
}

/// A built-in policy's (or a test fixture's) module bytes, as the binary embeds them.
fn module(name: &str) -> &'static [u8] {
    embedded_module(name).unwrap_or_else(|| panic!("no policy {name}"))
}

/// `bytes` with a custom section appended: the same component, other bytes —
/// another sha256, and nothing any process has compiled (and cached) before.
fn with_custom_section(bytes: &[u8], tag: &str) -> Vec<u8> {
    fn leb128(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let name = b"ipvs-operator-test";
    let mut payload = Vec::new();
    leb128(name.len(), &mut payload);
    payload.extend_from_slice(name);
    payload.extend_from_slice(tag.as_bytes());
    let mut out = bytes.to_vec();
    out.push(0); // custom section
    leb128(payload.len(), &mut out);
    out.extend(payload);
    out
}

/// A Kubernetes timestamp (whole seconds, UTC).
fn rfc3339(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// Now, `seconds` from now (negative: ago), to the second.
fn now_plus(seconds: i64) -> Timestamp {
    Timestamp::from_second(Timestamp::now().as_second() + seconds).expect("a time")
}


/// The virtual service of WeightedService `name` (port 80 of its Service).
fn vip(bed: &Testbed, name: &str) -> SocketAddr {
    SocketAddr::new(bed.cluster_ip("default", name), 80)
}

/// Pod name by pod IP, in `default`.
fn pods_by_ip(bed: &Testbed) -> BTreeMap<IpAddr, String> {
    bed.handle()
        .list("pods", Some("default"))
        .iter()
        .filter_map(|p| Some((p["status"]["podIP"].as_str()?.parse().ok()?, p["metadata"]["name"].as_str()?.to_string())))
        .collect()
}

/// Every weight the kernel has for `vip`, by pod name.
fn weights_by_pod(bed: &Testbed, vip: SocketAddr) -> BTreeMap<String, u32> {
    let Some(entry) = bed.ipvs().into_iter().find(|e| e.service.address() == Some(vip)) else {
        return BTreeMap::new();
    };
    let by_ip = pods_by_ip(bed);
    entry
        .destinations
        .iter()
        .filter_map(|d| Some((by_ip.get(&d.socket_addr().ip())?.clone(), d.weight)))
        .collect()
}

/// Wait until the kernel's weights for `vip` satisfy `check`; they are returned.
fn wait_for_weights(bed: &Testbed, vip: SocketAddr, what: &str, check: impl Fn(&BTreeMap<String, u32>) -> bool) -> BTreeMap<String, u32> {
    wait_until(TIMEOUT, what, || {
        let w = weights_by_pod(bed, vip);
        check(&w).then_some(w)
    })
}

/// The kernel keeps exactly `expected` for `vip` during `period`.
fn assert_weights_hold(bed: &Testbed, vip: SocketAddr, expected: &BTreeMap<String, u32>, period: Duration) {
    let until = Instant::now() + period;
    while Instant::now() < until {
        assert_eq!(&weights_by_pod(bed, vip), expected, "the kernel's weights changed");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The pods' share of the weights matching `selected` (all destinations are ready here).
fn weight_share(weights: &BTreeMap<String, u32>, selected: impl Fn(&str) -> bool) -> f64 {
    let total: u32 = weights.values().sum();
    let chosen: u32 = weights.iter().filter(|(p, _)| selected(p)).map(|(_, w)| w).sum();
    if total == 0 { 0.0 } else { f64::from(chosen) / f64::from(total) }
}

/// The measured share of the connections answered by pods matching `selected`
/// is within 2 percentage points of `expected`; returned.
fn assert_share(what: &str, counts: &BTreeMap<String, usize>, selected: impl Fn(&str) -> bool, expected: f64) -> f64 {
    let total: usize = counts.values().sum();
    let chosen: usize = counts.iter().filter(|(p, _)| selected(p)).map(|(_, n)| n).sum();
    let share = chosen as f64 / total as f64;
    assert!(
        (share - expected).abs() <= 0.02,
        "{what}: measured {:.2} %, expected {:.2} % (counts {counts:?})",
        share * 100.0,
        expected * 100.0
    );
    eprintln!("{what}: measured {:.2} %, expected {:.2} % of {total} connections", share * 100.0, expected * 100.0);
    share
}

/// Apply a JSON merge patch to WeightedService `name`.
fn patch_ws(bed: &Testbed, name: &str, patch: Value) {
    let api: Api<WeightedService> = Api::namespaced(bed.client(), "default");
    bed.block_on(api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))).expect("patching the WeightedService");
}

/// The status of WeightedService `name` once it is of the current generation and `check` accepts it.
fn wait_for_status(bed: &Testbed, name: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    wait_until(TIMEOUT, what, || {
        let ws = bed.get("weightedservices", "default", name)?;
        let current = ws["status"]["observedGeneration"] == ws["metadata"]["generation"];
        (current && check(&ws["status"])).then(|| ws["status"].clone())
    })
}

/// A condition of a status, by type.
fn condition<'a>(status: &'a Value, type_: &str) -> Option<&'a Value> {
    status["conditions"].as_array()?.iter().find(|c| c["type"] == type_)
}

/// The message of a status.
fn message(status: &Value) -> &str {
    status["message"].as_str().unwrap_or("")
}

/// (reason, note, how many times) of the Events (events.k8s.io/v1) about
/// WeightedService `name` (a count above 1 is an Event's series).
fn events_about(bed: &Testbed, name: &str) -> Vec<(String, String, i32)> {
    use k8s_openapi::api::events::v1::Event;
    let api: Api<Event> = Api::namespaced(bed.client(), "default");
    let list = bed.block_on(api.list(&ListParams::default())).expect("listing Events");
    list.items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default(), e.series.map_or(1, |s| s.count)))
        .collect()
}

/// A metric of both the agent and the controller (0 when it has no sample yet).
fn both_metrics(bed: &Testbed, name: &str, labels: &str) -> (f64, f64) {
    (bed.agent_metric(name, labels).unwrap_or(0.0), bed.controller_metric(name, labels).unwrap_or(0.0))
}

// ---- each built-in policy, from its example ----

#[test]
fn label_selector_share_mode_example_gives_the_canary_10_percent_whatever_the_replica_counts() {
    let mut bed = Testbed::new(config("wrr"));
    bed.load(include_str!("../../examples/label-selector-share-pods.yaml"));
    bed.load(include_str!("../../examples/label-selector-share.yaml"));
    bed.start_all();
    let vip = vip(&bed, "shop");
    // 90 : 10 over 4 prod pods and 1 canary: 9 each and 4 (36 : 4), as the example says.
    wait_for_weights(&bed, vip, "prod pods at 9 and the canary at 4", |w| {
        w.len() == 5 && w.iter().all(|(pod, w)| *w == if pod.contains("canary") { 4 } else { 9 })
    });
    let counts = bed.connect(vip, 3000);
    assert_share("label-selector share mode, canary", &counts, |p| p.contains("canary"), 0.10);
    let status = wait_for_status(&bed, "shop", "a status with the 90/10 split", |s| {
        (s["groups"][1]["share"].as_f64().unwrap_or(0.0) - 0.10).abs() < 1e-3
    });
    assert_eq!(condition(&status, "PolicyReady").map(|c| c["status"].clone()), Some("True".into()), "{status}");
}

#[test]
fn gradual_rollout_example_starts_with_the_canary_pods_and_a_start_time_sets_the_step() {
    let mut bed = Testbed::new(config("wrr"));
    bed.load(include_str!("../../examples/gradual-rollout-pods.yaml"));
    bed.load(include_str!("../../examples/gradual-rollout.yaml"));
    bed.start_all();
    let vip = vip(&bed, "checkout");
    let canary = |p: &str| p.contains("canary");
    // No startTime: the rollout started when the oldest canary pod was created
    // (when the pods were loaded): step 1/4, 5 % for 10 minutes.
    wait_for_weights(&bed, vip, "the canary at 5 % of the weights", |w| w.len() == 5 && (weight_share(w, canary) - 0.05).abs() < 0.005);
    assert_share("gradual-rollout step 1/4, canary", &bed.connect(vip, 3000), canary, 0.05);
    let status = wait_for_status(&bed, "checkout", "step 1/4 in the status", |s| message(s).starts_with("step 1/4: canary 5 %"));
    eprintln!("gradual-rollout status: {}", message(&status));

    // Started 15 minutes ago: step 2/4 (25 %, from minute 10 to minute 30).
    patch_ws(&bed, "checkout", json!({"spec": {"policy": {"config": {"startTime": rfc3339(now_plus(-15 * 60))}}}}));
    wait_for_weights(&bed, vip, "the canary at 25 % of the weights", |w| w.len() == 5 && (weight_share(w, canary) - 0.25).abs() < 0.005);
    assert_share("gradual-rollout step 2/4, canary", &bed.connect(vip, 3000), canary, 0.25);
    let status = wait_for_status(&bed, "checkout", "step 2/4 in the status", |s| message(s).starts_with("step 2/4: canary 25 %, next in"));
    eprintln!("gradual-rollout status: {}", message(&status));
}

#[test]
fn slow_start_example_ramps_a_new_pods_weight_in_the_kernel_and_a_long_window_holds_its_share() {
    const STEADY: &str = r#"
apiVersion: codesink.net/v1alpha1
kind: WeightedService
metadata: {name: api-steady}
spec:
  selector: {app: api}
  ports: [{protocol: TCP, port: 80, targetPort: www}]
  scheduler: wlc
  policy:
    name: slow-start
    config: {window: 1h, minWeightPercent: 25}
"#;
    // The example's scheduler is wlc: so is kube-proxy's.
    let mut bed = Testbed::new(config("wlc"));
    let pods: Value = serde_yaml::from_str(include_str!("../../examples/slow-start-pods.yaml")).expect("the example's pods");
    let (new, old): (Vec<&Value>, Vec<&Value>) =
        pods["items"].as_array().expect("a List").iter().partition(|p| p["metadata"]["name"] == "api-4");
    // api-1..3 have been running for an hour; api-4 is the scale-up, later.
    let hour_ago = rfc3339(now_plus(-3600));
    for pod in &old {
        bed.load(&pod.to_string());
        bed.set_pod_creation_time("default", pod["metadata"]["name"].as_str().expect("a name"), &hour_ago);
    }
    bed.load(include_str!("../../examples/slow-start.yaml"));
    bed.load(STEADY);
    bed.start_all();
    let (ramp, steady) = (vip(&bed, "api"), vip(&bed, "api-steady"));
    for name in ["api", "api-steady"] {
        wait_for_status(&bed, name, "the old pods warm", |s| message(s).starts_with("all endpoints warm"));
    }
    wait_until(TIMEOUT, "the agent to evaluate both", || {
        (bed.agent_metric("ipvs_operator_policy_evaluations_total", "policy=\"slow-start\",result=\"ok\"")? >= 2.0).then_some(())
    });
    for vip in [ramp, steady] {
        wait_for_weights(&bed, vip, "three warm pods at 1", |w| w.len() == 3 && w.values().all(|w| *w == 1));
    }

    // The scale-up: api-4 becomes ready now (the agent sees it after `loaded`).
    let loaded = Instant::now();
    bed.load(&new[0].to_string());
    let window = 120.0;
    let samples = std::thread::scope(|scope| {
        // The example (window 2m, from 10 %): api-4's weight in the kernel, every 250 ms, until all are warm.
        let sampler = scope.spawn(|| {
            let mut samples: Vec<(f64, BTreeMap<String, u32>)> = Vec::new();
            while loaded.elapsed() < Duration::from_secs(200) {
                let w = weights_by_pod(&bed, ramp);
                let t = loaded.elapsed().as_secs_f64();
                let warm = w.len() == 4 && w.values().all(|w| *w == 1);
                if w.len() == 4 {
                    samples.push((t, w));
                }
                if warm && t > 30.0 {
                    break;
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            samples
        });
        // The long window holds api-4 at 25 % of a warm pod's weight: measure that split meanwhile.
        wait_for_weights(&bed, steady, "api-4 at 25, the warm pods at 100", |w| {
            w.len() == 4 && w.iter().all(|(pod, w)| *w == if pod == "api-4" { 25 } else { 100 })
        });
        let counts = bed.connect(steady, 3000);
        assert_share("slow-start (window 1h, 25 %), api-4", &counts, |p| p == "api-4", 25.0 / 325.0);
        let status = wait_for_status(&bed, "api-steady", "api-4 warming in the status", |s| message(s).starts_with("1 warming up (api-4 at 25 %)"));
        eprintln!("slow-start status: {}", message(&status));
        sampler.join().expect("the sampler")
    });

    // What the example's curve says at t seconds after api-4 became ready (×100 while warming).
    let curve = |t: f64| (100.0 * (t.max(1.0) / window).clamp(0.1, 1.0)).round() as u32;
    let scaled: Vec<(f64, u32)> = samples
        .iter()
        // Warm pods at 100: api-4 is warming; at 1 it is kube-proxy's, not yet the agent's.
        .filter(|(_, w)| w.iter().all(|(pod, w)| pod == "api-4" || *w == 100) && w["api-4"] > 1)
        .map(|(t, w)| (*t, w["api-4"]))
        .collect();
    let ramp_values: Vec<u32> = {
        let mut v: Vec<u32> = scaled.iter().map(|(_, w)| *w).collect();
        v.dedup();
        v
    };
    eprintln!("slow-start: api-4's kernel weight (warm pods at 100) went {ramp_values:?}");
    assert!(scaled.windows(2).all(|p| p[0].1 <= p[1].1), "the weight went down: {scaled:?}");
    assert_eq!(ramp_values.first(), Some(&10), "it starts at minWeightPercent: {scaled:?}");
    assert!(ramp_values.iter().filter(|w| **w > 10 && **w < 100).count() >= 5, "too few steps: {ramp_values:?}");
    for (t, w) in &scaled {
        // api-4 was created after `loaded` (its creation time is to the second),
        // and the agent evaluates at most 6 s apart (window / 20).
        assert!(*w <= curve(t + 1.0) + 1 && *w + 1 >= curve(t - 15.0), "{w} at {t:.1} s is off the curve: {scaled:?}");
    }
    let (warm_at, last) = samples.last().expect("samples");
    assert!(last.values().all(|w| *w == 1), "never warm: {last:?}");
    assert!(*warm_at >= window - 2.0 && *warm_at <= window + 20.0, "warm after {warm_at:.1} s");
    eprintln!("slow-start: all warm {warm_at:.1} s after the scale-up (window {window} s)");
}

#[test]
fn prefer_local_example_keeps_most_connections_on_this_node() {
    let mut bed = Testbed::new(config("wrr"));
    bed.load(include_str!("../../examples/prefer-local-pods.yaml"));
    // The testbed's node, node-1 in zone-a, plays the example's node-a1.
    bed.handle()
        .update_pod("default", "cache-1", &PodUpdate { node: Some("node-1".into()), ..PodUpdate::default() })
        .expect("moving cache-1");
    bed.load(include_str!("../../examples/prefer-local.yaml"));
    bed.start_all();
    let vip = vip(&bed, "cache");
    // Local 100, node-a2 in the same zone 10, node-b1's two 1.
    let expected: BTreeMap<String, u32> = [("cache-1", 100), ("cache-2", 10), ("cache-3", 1), ("cache-4", 1)]
        .into_iter()
        .map(|(p, w)| (p.to_string(), w))
        .collect();
    wait_for_weights(&bed, vip, "100 local, 10 in the zone, 1 remote", |w| *w == expected);
    let counts = bed.connect(vip, 3000);
    for (pod, weight) in &expected {
        assert_share(&format!("prefer-local, {pod}"), &counts, |p| p == pod, f64::from(*weight) / 112.0);
    }
    // The controller has no node: its view is cluster-wide.
    wait_for_status(&bed, "cache", "the cluster-wide view in the status", |s| message(s) == "cluster-wide view: 4 ready, all remote");
}

// ---- a rollout, stepping ----

#[test]
fn a_gradual_rollout_is_seen_stepping_in_the_kernel_and_in_the_status() {
    const ROLLOUT: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: store-stable}
spec:
  replicas: 3
  selector: {matchLabels: {app: store, track: stable}}
  template:
    metadata: {labels: {app: store, track: stable}}
    spec:
      containers: [{name: store, image: store, ports: [{containerPort: 8080, name: www}]}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: store-canary}
spec:
  replicas: 2
  selector: {matchLabels: {app: store, track: canary}}
  template:
    metadata: {labels: {app: store, track: canary}}
    spec:
      containers: [{name: store, image: store, ports: [{containerPort: 8080, name: www}]}]
---
apiVersion: codesink.net/v1alpha1
kind: WeightedService
metadata: {name: store, namespace: default}
spec:
  selector: {app: store}
  ports: [{protocol: TCP, port: 80, targetPort: www}]
  scheduler: wrr
  policy:
    name: gradual-rollout
    config:
      canary: {track: canary}
      steps: [{share: 10, hold: 10s}, {share: 50, hold: 20s}, {share: 100}]
      startTime: "START"
"#;
    let mut bed = Testbed::new(config("wrr"));
    // Planned an hour from now: the canary gets nothing yet.
    bed.load(&ROLLOUT.replace("START", &rfc3339(now_plus(3600))));
    bed.start_all();
    let vip = vip(&bed, "store");
    let canary = |p: &str| p.contains("canary");
    wait_for_weights(&bed, vip, "the canary at 0", |w| w.len() == 5 && weight_share(w, canary) == 0.0 && w.values().any(|w| *w > 0));
    wait_for_status(&bed, "store", "a rollout not started", |s| message(s).starts_with("starts in 59m"));

    // Start it now: 10 % until +10 s, 50 % until +30 s, then 100 %.
    let start = now_plus(0);
    patch_ws(&bed, "store", json!({"spec": {"policy": {"config": {"startTime": rfc3339(start)}}}}));
    let since_start = || (Timestamp::now().as_millisecond() - start.as_millisecond()) as f64 / 1000.0;
    let mut samples: Vec<(f64, f64)> = Vec::new();
    let mut messages: Vec<String> = Vec::new();
    while since_start() < 60.0 {
        let w = weights_by_pod(&bed, vip);
        let t = since_start();
        if w.len() == 5 {
            samples.push((t, (weight_share(&w, canary) * 1000.0).round() / 1000.0));
        }
        if let Some(m) = bed.get("weightedservices", "default", "store").and_then(|ws| ws["status"]["message"].as_str().map(String::from))
            && messages.last() != Some(&m)
        {
            messages.push(m);
        }
        let done = samples.len() >= 5 && samples[samples.len() - 5..].iter().all(|(t, s)| *s == 1.0 && *t > 30.0);
        if done && messages.last().is_some_and(|m| m.contains("rollout complete")) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // The shares the kernel held (for at least two samples in a row: a pass
    // writes one destination after the other), and since when.
    let mut held: Vec<(f64, f64)> = Vec::new();
    for pair in samples.windows(2) {
        let ((t, share), (_, next)) = (pair[0], pair[1]);
        if share == next && held.last().is_none_or(|(_, s)| *s != share) {
            held.push((t, share));
        }
    }
    eprintln!("gradual rollout: (seconds after start, canary share of the weights) {held:?}");
    eprintln!("gradual rollout: status messages {messages:#?}");
    let steps: Vec<f64> = held.iter().map(|(_, s)| *s).filter(|s| *s > 0.0).collect();
    let plan = [0.1, 0.5, 1.0];
    assert!(steps.len() == 3 && steps.iter().zip(plan).all(|(s, p)| (s - p).abs() < 0.005), "{held:?}");
    let when = |share: f64| held.iter().find(|(_, s)| (s - share).abs() < 0.005).map(|(t, _)| *t).expect("seen");
    assert!(when(0.1) < 5.0, "step 1 only {:.1} s after the start", when(0.1));
    for (share, at) in [(0.5, 10.0), (1.0, 30.0)] {
        let lag = when(share) - at;
        assert!((-0.5..=5.0).contains(&lag), "the {share} step was in the kernel {lag:.1} s after its time");
        eprintln!("gradual rollout: step to {} % in the kernel {:.1} s after its time", share * 100.0, lag);
    }
    for expected in ["step 1/3: canary 10 %, next in", "step 2/3: canary 50 %, next in", "step 3/3: canary 100 %, rollout complete"] {
        assert!(messages.iter().any(|m| m.starts_with(expected)), "no status message {expected:?}: {messages:?}");
    }
}

// ---- policy modules from a ConfigMap directory ----

/// A policy directory laid out as the kubelet mounts a ConfigMap: the files in
/// a timestamped directory, `..data` pointing at it, `NAME` → `..data/NAME`.
struct ConfigMapDir {
    dir: tempfile::TempDir,
    generation: u32,
}

impl ConfigMapDir {
    fn new(files: &[(&str, &[u8])]) -> Self {
        let dir = tempfile::Builder::new().prefix("policies-").tempdir().expect("a temp dir");
        let mut config_map = ConfigMapDir { dir, generation: 0 };
        config_map.update(files);
        config_map
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Update it as the kubelet does: write a new timestamped directory, swap
    /// `..data` to it atomically (a rename over the old link), add missing
    /// links, remove the old directory.
    fn update(&mut self, files: &[(&str, &[u8])]) {
        use std::os::unix::fs::symlink;
        self.generation += 1;
        let root = self.dir.path();
        let old = std::fs::read_link(root.join("..data")).ok();
        let version = format!("..{}.{}", Timestamp::now().strftime("%Y_%m_%d_%H_%M_%S"), self.generation);
        std::fs::create_dir(root.join(&version)).expect("a version directory");
        for (file, bytes) in files {
            std::fs::write(root.join(&version).join(file), bytes).expect("writing a module");
        }
        let _ = std::fs::remove_file(root.join("..data_tmp"));
        symlink(&version, root.join("..data_tmp")).expect("the ..data_tmp link");
        std::fs::rename(root.join("..data_tmp"), root.join("..data")).expect("swapping ..data");
        for (file, _) in files {
            let link = root.join(file);
            if link.symlink_metadata().is_err() {
                symlink(format!("..data/{file}"), &link).expect("a file link");
            }
        }
        if let Some(old) = old {
            let _ = std::fs::remove_dir_all(root.join(old));
        }
    }
}

/// Two prod pods on this node, a canary on node-2, and a WeightedService with
/// the seed's groups (prod 10, canary 1) whose policy is the module `mine`.
fn module_bed(first: &[u8]) -> (Testbed, ConfigMapDir, SocketAddr, BTreeMap<String, u32>) {
    const WS: &str = r#"
apiVersion: codesink.net/v1alpha1
kind: WeightedService
metadata: {name: web, namespace: default}
spec:
  selector: {app: web}
  ports: [{protocol: TCP, port: 80, targetPort: www}]
  scheduler: wrr
  weights:
  - {weight: 10, selector: {env: prod}}
  - {weight: 1, selector: {env: canary}}
  policy: {name: mine, config: {}}
"#;
    let dir = ConfigMapDir::new(&[("mine.wasm", first)]);
    let mut bed = Testbed::new(TestbedConfig { policy_dir: Some(dir.path().to_path_buf()), ..config("wrr") });
    let pods = [
        pod_manifest("web-prod-1", &[("app", "web"), ("env", "prod")], "node-1", "10.244.9.11"),
        pod_manifest("web-prod-2", &[("app", "web"), ("env", "prod")], "node-1", "10.244.9.12"),
        pod_manifest("web-canary-1", &[("app", "web"), ("env", "canary")], "node-2", "10.244.9.13"),
    ];
    bed.load(&pods.concat());
    bed.load(WS);
    bed.start_all();
    let vip = vip(&bed, "web");
    let weights = wait_for_weights(&bed, vip, "the first module's weights (prod 10, canary 1)", |w| {
        w.len() == 3 && w.iter().all(|(pod, w)| *w == if pod.contains("canary") { 1 } else { 10 })
    });
    (bed, dir, vip, weights)
}

/// How long until `check` holds, polled every 5 ms.
fn time_until(what: &str, check: impl Fn() -> bool) -> Duration {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < TIMEOUT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
    started.elapsed()
}

#[test]
fn a_module_replaced_in_the_config_map_changes_the_kernel_weights_without_a_restart() {
    let first = module("label-selector");
    let (bed, mut dir, vip, _) = module_bed(first);
    let before = wait_for_status(&bed, "web", "the module in the status", |s| s["policy"]["name"] == "mine");

    // prefer-local as `mine` (prod is local: 100; the canary is remote: 1), with
    // bytes nobody compiled before: the reload includes compiling it.
    let second = with_custom_section(module("prefer-local"), &format!("{}-{}", bed.id, Timestamp::now()));
    dir.update(&[("mine.wasm", &second)]);
    let took = time_until("the second module's weights in the kernel", || {
        let w = weights_by_pod(&bed, vip);
        w.len() == 3 && w.iter().all(|(pod, w)| *w == if pod.contains("canary") { 1 } else { 100 })
    });
    eprintln!("hot reload: file change → kernel in {} ms (a new module, compiled on load)", took.as_millis());
    let compiled = bed.log("agent").lines().rev().find(|l| l.contains("policy compiled policy=\"mine\"")).unwrap_or("").to_string();
    eprintln!("hot reload: of which the agent's compile: {}", compiled.split_whitespace().last().unwrap_or("?"));
    let after = wait_for_status(&bed, "web", "the new module's hash in the status", |s| {
        s["policy"]["sha256"] != before["policy"]["sha256"] && message(s).starts_with("cluster-wide view")
    });
    assert_eq!(after["policy"]["name"], "mine", "{after}");
    let loads = both_metrics(&bed, "ipvs_operator_policy_loads_total", "policy=\"mine\"");
    assert!(loads.0 >= 1.0 && loads.1 >= 1.0, "reloads counted by the agent and the controller: {loads:?}");
    assert_share("after the reload, canary", &bed.connect(vip, 2000), |p| p.contains("canary"), 1.0 / 201.0);

    // Back to the first module, compiled before (from the compile cache).
    dir.update(&[("mine.wasm", first)]);
    let took = time_until("the first module's weights again", || {
        let w = weights_by_pod(&bed, vip);
        w.len() == 3 && w.iter().all(|(pod, w)| *w == if pod.contains("canary") { 1 } else { 10 })
    });
    eprintln!("hot reload: file change → kernel in {} ms (a module compiled before, from the compile cache)", took.as_millis());
    wait_for_status(&bed, "web", "the first module's hash again", |s| s["policy"]["sha256"] == before["policy"]["sha256"]);
    assert!(bed.agent_ready(), "the agent kept running");
}

#[test]
fn a_broken_module_is_refused_reported_and_the_working_one_stays_in_use() {
    let (bed, mut dir, vip, first_weights) = module_bed(module("label-selector"));
    let failures = |bed: &Testbed| both_metrics(bed, "ipvs_operator_policy_load_failures_total", "policy=\"mine\"");
    assert_eq!(failures(&bed), (0.0, 0.0));

    // Not a component at all.
    dir.update(&[("mine.wasm", b"\0asm garbage")]);
    wait_until(TIMEOUT, "an Event saying why the module was refused", || {
        events_about(&bed, "web").into_iter().find(|(reason, note, _)| reason == "PolicyModuleRefused" && note.contains("mine.wasm"))
    });
    wait_until(TIMEOUT, "the refusal counted by the agent and the controller", || (failures(&bed) == (1.0, 1.0)).then_some(()));
    assert!(bed.log("agent").contains("policy module refused"), "the agent logs the refusal");
    assert_weights_hold(&bed, vip, &first_weights, Duration::from_secs(3));
    // The working module is still the one evaluated: a canary that turns prod gets prod's weight.
    bed.handle().set_pod_label("default", "web-canary-1", "env", Some("prod")).expect("relabelling");
    let all_prod = wait_for_weights(&bed, vip, "the relabelled canary at 10", |w| w.len() == 3 && w.values().all(|w| *w == 10));

    // A module that imports WASI (the "nosy" fixture): refused at load as well
    // (its compile takes a while: it has the whole of WASI's std in it).
    dir.update(&[("mine.wasm", module("nosy"))]);
    wait_until(TIMEOUT, "the second refusal counted", || (failures(&bed) == (2.0, 2.0)).then_some(()));
    assert!(bed.log("controller").contains("imports wasi:"), "the controller logs why");
    // A new reason is a new Event, with its own message (not the first
    // refusal's, counted again).
    let refused = wait_until(TIMEOUT, "an Event with the second refusal's reason", || {
        let events = events_about(&bed, "web");
        let refused: Vec<_> = events.into_iter().filter(|(reason, _, _)| reason == "PolicyModuleRefused").collect();
        refused.iter().any(|(_, note, _)| note.contains("imports wasi:")).then_some(refused)
    });
    eprintln!("refusal Events: {refused:#?}");
    assert_weights_hold(&bed, vip, &all_prod, Duration::from_secs(3));
    let status = wait_for_status(&bed, "web", "the status", |s| s["policy"]["name"] == "mine");
    assert_eq!(condition(&status, "PolicyReady").map(|c| c["status"].clone()), Some("True".into()), "{status}");

    // A working module replaces the refused one.
    dir.update(&[("mine.wasm", module("prefer-local"))]);
    wait_for_weights(&bed, vip, "the working module's weights", |w| {
        w.len() == 3 && w.iter().all(|(pod, w)| *w == if pod == "web-canary-1" { 1 } else { 100 })
    });
}

#[test]
fn a_sha256_pin_that_does_not_match_keeps_the_last_good_weights_and_says_why() {
    let mut manifests = String::new();
    for app in ["a", "b"] {
        for (track, replicas) in [("prod", 2), ("canary", 1)] {
            manifests.push_str(&format!(
                r#"
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {app}-{track}}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: {app}, env: {track}}}}}
  template:
    metadata: {{labels: {{app: {app}, env: {track}}}}}
    spec:
      containers: [{{name: web, image: web, ports: [{{containerPort: 8080, name: www}}]}}]
---
"#
            ));
        }
    }
    for (name, app) in [("pinned", "a"), ("other", "b")] {
        manifests.push_str(&format!(
            r#"
apiVersion: codesink.net/v1alpha1
kind: WeightedService
metadata: {{name: {name}, namespace: default}}
spec:
  selector: {{app: {app}}}
  ports: [{{protocol: TCP, port: 80, targetPort: www}}]
  scheduler: wrr
  weights:
  - {{weight: 10, selector: {{env: prod}}}}
  - {{weight: 1, selector: {{env: canary}}}}
---
"#
        ));
    }
    let mut bed = Testbed::new(config("wrr"));
    bed.load(&manifests);
    bed.start_all();
    let (pinned, other) = (vip(&bed, "pinned"), vip(&bed, "other"));
    let seed = |canary: u32| {
        move |w: &BTreeMap<String, u32>| w.len() == 3 && w.iter().all(|(pod, w)| *w == if pod.contains("canary") { canary } else { 10 })
    };
    let good = wait_for_weights(&bed, pinned, "pinned at 10/1", seed(1));
    wait_for_weights(&bed, other, "other at 10/1", seed(1));
    let status = wait_for_status(&bed, "pinned", "the policy's hash in the status", |s| s["policy"]["sha256"].is_string());
    let hash = status["policy"]["sha256"].as_str().expect("a hash").to_string();

    // Pinned to the right hash: applied.
    patch_ws(&bed, "pinned", json!({"spec": {"policy": {"name": "label-selector", "sha256": hash}}}));
    wait_for_status(&bed, "pinned", "the right pin accepted", |s| {
        condition(s, "PolicyReady").is_some_and(|c| c["status"] == "True")
    });

    // A wrong pin, and new weights with it: not applied.
    let wrong = "0".repeat(64);
    patch_ws(&bed, "pinned", json!({"spec": {
        "policy": {"sha256": wrong},
        "weights": [{"weight": 10, "selector": {"env": "prod"}}, {"weight": 5, "selector": {"env": "canary"}}],
    }}));
    let status = wait_for_status(&bed, "pinned", "PolicyReady False for the pin", |s| {
        condition(s, "PolicyReady").is_some_and(|c| c["status"] == "False")
    });
    let policy_ready = condition(&status, "PolicyReady").expect("PolicyReady");
    assert_eq!(policy_ready["reason"], "PolicyPinMismatch", "{status}");
    let why = policy_ready["message"].as_str().unwrap_or("");
    assert!(why.contains("sha256") && why.contains(&hash) && why.contains(&wrong), "{why}");
    assert_eq!(condition(&status, "Ready").map(|c| c["status"].clone()), Some("False".into()), "{status}");
    eprintln!("pin mismatch: {why}");
    // The agent refused it too (its Event), and the kernel keeps the last good weights.
    wait_until(TIMEOUT, "the agent's Event about the pin", || {
        events_about(&bed, "pinned").into_iter().find(|(reason, note, _)| reason == "PolicyPinMismatch" && note.contains("node-1"))
    });
    assert_weights_hold(&bed, pinned, &good, Duration::from_secs(3));

    // The other WeightedService is still served: its edit reaches the kernel and real connections.
    patch_ws(&bed, "other", json!({"spec": {"weights": [
        {"weight": 10, "selector": {"env": "prod"}}, {"weight": 5, "selector": {"env": "canary"}},
    ]}}));
    wait_for_weights(&bed, other, "other's canary at 5", seed(5));
    assert_share("the other WeightedService, canary", &bed.connect(other, 1000), |p| p.contains("canary"), 5.0 / 25.0);
    assert_eq!(weights_by_pod(&bed, pinned), good, "the pinned WeightedService's weights changed");

    // The right pin again: the new weights are applied.
    patch_ws(&bed, "pinned", json!({"spec": {"policy": {"sha256": hash}}}));
    wait_for_weights(&bed, pinned, "pinned's canary at 5", seed(5));
    wait_for_status(&bed, "pinned", "PolicyReady again", |s| condition(s, "PolicyReady").is_some_and(|c| c["status"] == "True"));
}
