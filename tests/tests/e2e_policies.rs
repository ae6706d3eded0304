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
use std::time::{Duration, Instant};

use ipvs_operator::crd::WeightedService;
use ipvs_operator::policy::embedded_module;
use ipvs_operator_tests::apiserver::PodUpdate;
use ipvs_operator_tests::procstat::status_kib;
use ipvs_operator_tests::policy_dir::{ConfigMapDir, with_custom_section};
use ipvs_operator_tests::testbed::{Testbed, TestbedConfig, pod_manifest, wait_until};
use k8s_openapi::jiff::Timestamp;
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

/// A built-in policy's module bytes, as the binary embeds them. (The test
/// fixtures are `policy_fixtures`'.)
fn module(name: &str) -> &'static [u8] {
    embedded_module(name).unwrap_or_else(|| panic!("no policy {name}"))
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
    let pods: Value = serde_saphyr::from_str(include_str!("../../examples/slow-start-pods.yaml")).expect("the example's pods");
    let (new, old): (Vec<&Value>, Vec<&Value>) =
        pods["items"].as_array().expect("a List").iter().partition(|p| p["metadata"]["name"] == "api-4");
    // api-1..3 have been running for an hour; api-4 is the scale-up, later.
    let hour_ago = rfc3339(now_plus(-3600));
    // The example's Ready times are for `eval --now` on its day: the
    // controller reads them (the agent observes), so they move to today.
    let ready_since = |pod: &Value, t: &str| -> String {
        let mut pod = pod.clone();
        for c in pod["status"]["conditions"].as_array_mut().into_iter().flatten() {
            c["lastTransitionTime"] = json!(t);
        }
        pod.to_string()
    };
    for pod in &old {
        bed.load(&ready_since(pod, &hour_ago));
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
    bed.load(&ready_since(new[0], &rfc3339(Timestamp::now())));
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
    let dir = ConfigMapDir::new(&[("mine.wasm", first)]).expect("a policy directory");
    let mut bed = Testbed::new(TestbedConfig {
        policy_dir: Some(dir.path().to_path_buf()),
        ..config("wrr")
    });
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
    let second = with_custom_section(
        module("prefer-local"),
        &format!("{}-{}", bed.id, Timestamp::now()),
        0,
    );
    dir.update(&[("mine.wasm", &second)])
        .expect("updating the policy directory");
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
    dir.update(&[("mine.wasm", first)])
        .expect("updating the policy directory");
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
    dir.update(&[("mine.wasm", b"\0asm garbage")])
        .expect("updating the policy directory");
    wait_until(
        TIMEOUT,
        "an Event saying why the module was refused",
        || {
            events_about(&bed, "web")
                .into_iter()
                .find(|(reason, note, _)| {
                    reason == "PolicyModuleRefused" && note.contains("mine.wasm")
                })
        },
    );
    wait_until(
        TIMEOUT,
        "the refusal counted by the agent and the controller",
        || (failures(&bed) == (1.0, 1.0)).then_some(()),
    );
    assert!(
        bed.log("agent").contains("policy module refused"),
        "the agent logs the refusal"
    );
    assert_weights_hold(&bed, vip, &first_weights, Duration::from_secs(3));
    // The working module is still the one evaluated: a canary that turns prod gets prod's weight.
    bed.handle().set_pod_label("default", "web-canary-1", "env", Some("prod")).expect("relabelling");
    let all_prod = wait_for_weights(&bed, vip, "the relabelled canary at 10", |w| w.len() == 3 && w.values().all(|w| *w == 10));

    // A module that imports WASI (the "nosy" fixture): refused at load as well,
    // from its imports, before it is compiled.
    dir.update(&[("mine.wasm", policy_fixtures::NOSY)])
        .expect("updating the policy directory");
    wait_until(TIMEOUT, "the second refusal counted", || {
        (failures(&bed) == (2.0, 2.0)).then_some(())
    });
    assert!(
        bed.log("controller").contains("imports wasi:"),
        "the controller logs why"
    );
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
    dir.update(&[("mine.wasm", module("prefer-local"))])
        .expect("updating the policy directory");
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
    // Reported once, by the controller: the agent refuses it too, but a
    // failure the status shows is not every node's to report. The kernel
    // keeps the last good weights.
    wait_until(TIMEOUT, "the controller's Event about the pin", || {
        events_about(&bed, "pinned").into_iter().find(|(reason, _, _)| reason == "PolicyPinMismatch")
    });
    assert!(failures_on_node(&bed, "pinned").is_empty(), "{:?}", events_about(&bed, "pinned"));
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

// ---- hostile modules (issue 16) ----

/// A WeightedService `name` over the `app: web` pods, prod 10 and canary 1,
/// with policy `policy` and `config`.
fn web_ws(name: &str, policy: &str, config: &str) -> String {
    format!(
        r#"
apiVersion: codesink.net/v1alpha1
kind: WeightedService
metadata: {{name: {name}, namespace: default}}
spec:
  selector: {{app: web}}
  ports: [{{protocol: TCP, port: 80, targetPort: www}}]
  scheduler: wrr
  weights:
  - {{weight: 10, selector: {{env: prod}}}}
  - {{weight: 1, selector: {{env: canary}}}}
  policy: {{name: {policy}, config: {config}}}
---
"#
    )
}

#[test]
fn hostile_modules_are_refused_while_the_agent_stays_up_and_small_and_the_kernel_keeps_the_last_good_weights()
 {
    use policy_fixtures::hostile;
    // Each hostile module replaces a working one of the same name; `slow-start`
    // also shadows the built-in of that name.
    let hostile: Vec<(&str, Vec<u8>)> = vec![
        ("instances", hostile::many_instances(8, 60)),
        ("data", hostile::huge_data_segment()),
        ("fill", hostile::memory_fill(1 << 30)),
        ("bomb", hostile::compile_bomb()),
        ("spin", hostile::endless_loop()),
        ("big", hostile::oversized(20 << 20)),
        ("slow-start", hostile::endless_loop()),
    ];
    let good = module("label-selector");
    let files = |hostile_too: bool| -> Vec<(String, Vec<u8>)> {
        let mut files: Vec<(String, Vec<u8>)> = hostile
            .iter()
            .map(|(name, bytes)| {
                (
                    format!("{name}.wasm"),
                    if hostile_too {
                        bytes.clone()
                    } else {
                        good.to_vec()
                    },
                )
            })
            .collect();
        files.push(("good.wasm".into(), good.to_vec()));
        files.push(("chatty.wasm".into(), policy_fixtures::MISBEHAVING.to_vec()));
        files
    };
    let update = |dir: &mut ConfigMapDir, files: &[(String, Vec<u8>)]| {
        let refs: Vec<(&str, &[u8])> = files
            .iter()
            .map(|(n, b)| (n.as_str(), b.as_slice()))
            .collect();
        dir.update(&refs).expect("updating the policy directory");
    };
    let mut dir = ConfigMapDir::new(&[]).expect("a policy directory");
    update(&mut dir, &files(false));
    let mut bed = Testbed::new(TestbedConfig {
        policy_dir: Some(dir.path().to_path_buf()),
        // The compile bomb runs out of the child's address space at once; a
        // compile under the VM's emulated CPU takes seconds.
        policy_flags: vec!["--policy-compile-timeout".into(), "60s".into()],
        ..config("wrr")
    });
    let pods = [
        pod_manifest(
            "web-prod-1",
            &[("app", "web"), ("env", "prod")],
            "node-1",
            "10.244.9.21",
        ),
        pod_manifest(
            "web-prod-2",
            &[("app", "web"), ("env", "prod")],
            "node-1",
            "10.244.9.22",
        ),
        pod_manifest(
            "web-canary-1",
            &[("app", "web"), ("env", "canary")],
            "node-2",
            "10.244.9.23",
        ),
    ];
    bed.load(&pods.concat());
    let mut manifests = String::new();
    for (name, _) in &hostile {
        manifests.push_str(&web_ws(&format!("w-{name}"), name, "{}"));
    }
    manifests.push_str(&web_ws("w-good", "good", "{}"));
    manifests.push_str(&web_ws(
        "w-chatty",
        "chatty",
        r#"{"behave": "long-message"}"#,
    ));
    manifests.push_str(&web_ws("w-eager", "chatty", r#"{"behave": "requeue-now"}"#));
    bed.load(&manifests);
    bed.start_all();
    let seed = |canary: u32| {
        move |w: &BTreeMap<String, u32>| {
            w.len() == 3
                && w.iter()
                    .all(|(pod, w)| *w == if pod.contains("canary") { canary } else { 10 })
        }
    };
    let mut kept = BTreeMap::new();
    for (name, _) in &hostile {
        let ws = format!("w-{name}");
        kept.insert(
            ws.clone(),
            wait_for_weights(&bed, vip(&bed, &ws), &format!("{ws} at 10/1"), seed(1)),
        );
    }
    wait_for_weights(&bed, vip(&bed, "w-good"), "w-good at 10/1", seed(1));

    // The ConfigMap update that brings the hostile modules.
    update(&mut dir, &files(true));
    fn failures(bed: &Testbed, name: &str) -> f64 {
        bed.agent_metric(
            "ipvs_operator_policy_load_failures_total",
            &format!("policy=\"{name}\""),
        )
        .unwrap_or(0.0)
    }
    let started = Instant::now();
    for (name, _) in &hostile {
        wait_until(TIMEOUT, &format!("the agent refusing {name}"), || {
            (failures(&bed, name) >= 1.0).then_some(())
        });
    }
    eprintln!(
        "hostile modules: all refused {:.1} s after the update",
        started.elapsed().as_secs_f64()
    );
    let log = bed.log("agent");
    for (name, reason) in [
        ("instances", "core module instances"),
        ("data", "exceeds the sandbox's limits"),
        ("fill", "out of bounds"),
        ("bomb", "to compile and was stopped"),
        ("spin", "ran longer than its limit"),
        ("big", "over the limit of 8388608 bytes"),
        ("slow-start", "ran longer than its limit"),
    ] {
        assert!(
            log.lines().any(|l| l.contains("policy module refused")
                && l.contains(&format!("policy=\"{name}\""))
                && l.contains(reason)),
            "the agent's log does not refuse {name} for {reason:?}"
        );
    }
    // The agent is up, within its container's limit, and nothing it holds changed.
    assert!(bed.agent_ready(), "the agent kept running");
    let agent_pid = bed.pid("agent").expect("the agent's pid");
    let peak = status_kib(agent_pid, "VmHWM:").expect("the agent's peak RSS");
    eprintln!("hostile modules: the agent's peak RSS {} MiB", peak >> 10);
    assert!(
        peak > 0 && peak < 192 << 10,
        "the agent peaked at {} MiB (limit 192)",
        peak >> 10
    );
    for (ws, weights) in &kept {
        assert_weights_hold(&bed, vip(&bed, ws), weights, Duration::from_millis(500));
    }
    // Other WeightedServices are served: an edit reaches the kernel.
    patch_ws(
        &bed,
        "w-good",
        json!({"spec": {"weights": [
            {"weight": 10, "selector": {"env": "prod"}}, {"weight": 5, "selector": {"env": "canary"}},
        ]}}),
    );
    wait_for_weights(&bed, vip(&bed, "w-good"), "w-good's canary at 5", seed(5));

    // A 1 MiB message reaches status (and Events) cut to 1 KiB.
    let status = wait_for_status(&bed, "w-chatty", "the long message in the status", |s| {
        message(s).ends_with('…')
    });
    assert!(
        message(&status).len() <= 1024,
        "a status message of {} bytes",
        message(&status).len()
    );
    // A requeue after 0 ms is evaluated once a second at most.
    let evaluations = || {
        bed.agent_metric(
            "ipvs_operator_policy_evaluations_total",
            "policy=\"chatty\",result=\"ok\"",
        )
        .unwrap_or(0.0)
    };
    let before = evaluations();
    std::thread::sleep(Duration::from_secs(5));
    let eager = evaluations() - before;
    eprintln!(
        "hostile modules: a policy asking for requeue-after 0 ms was evaluated {eager} times in 5 s"
    );
    assert!(
        eager <= 7.0,
        "requeue-after 0 ms evaluated {eager} times in 5 s (floor: 1 s)"
    );

    // A restart of the agent and the controller: nothing of the working
    // modules is left, and no built-in stands in for `slow-start`. Edits
    // made meanwhile are not applied by anything: the kernel keeps its weights.
    bed.kill("agent");
    for ws in ["w-slow-start", "w-instances"] {
        patch_ws(
            &bed,
            ws,
            json!({"spec": {"weights": [
                {"weight": 10, "selector": {"env": "prod"}}, {"weight": 5, "selector": {"env": "canary"}},
            ]}}),
        );
    }
    bed.start_agent();
    bed.start_controller();
    wait_until(TIMEOUT, "the restarted agent ready", || {
        bed.agent_ready().then_some(())
    });
    wait_until(TIMEOUT, "the restarted agent refusing slow-start", || {
        (failures(&bed, "slow-start") >= 1.0).then_some(())
    });
    for ws in ["w-slow-start", "w-instances"] {
        assert_weights_hold(&bed, vip(&bed, ws), &kept[ws], Duration::from_secs(3));
    }
    let status = wait_for_status(
        &bed,
        "w-slow-start",
        "PolicyReady False for the refused module",
        |s| {
            condition(s, "PolicyReady")
                .is_some_and(|c| c["status"] == "False" && c["reason"] == "PolicyModuleRefused")
        },
    );
    let why = condition(&status, "PolicyReady")
        .and_then(|c| c["message"].as_str())
        .unwrap_or("")
        .to_string();
    assert!(why.contains("ran longer than its limit"), "{why}");
    // The status says it for the cluster; no node repeats it.
    assert!(failures_on_node(&bed, "w-slow-start").is_empty(), "{:?}", events_about(&bed, "w-slow-start"));
}

/// The agents' Events about policy failures of WeightedService `name` (they
/// say "on node"): only for what is particular to a node.
fn failures_on_node(bed: &Testbed, name: &str) -> Vec<(String, String, i32)> {
    events_about(bed, name).into_iter().filter(|(reason, note, _)| reason.starts_with("Policy") && note.contains("on node")).collect()
}

#[test]
fn an_agent_restart_mid_slow_start_never_lowers_a_warming_endpoints_share() {
    const WS: &str = r#"
apiVersion: codesink.net/v1alpha1
kind: WeightedService
metadata: {name: warm, namespace: default}
spec:
  selector: {app: warm}
  ports: [{protocol: TCP, port: 80, targetPort: www}]
  scheduler: wrr
  policy: {name: slow-start, config: {window: 90s, minWeightPercent: 10}}
"#;
    let mut bed = Testbed::new(config("wrr"));
    bed.load(&pod_manifest(
        "warm-old",
        &[("app", "warm")],
        "node-1",
        "10.244.9.31",
    ));
    bed.set_pod_creation_time("default", "warm-old", &rfc3339(now_plus(-3600)));
    // The new pod was created a while ago but is not ready yet.
    bed.load(&pod_manifest(
        "warm-new",
        &[("app", "warm")],
        "node-1",
        "10.244.9.32",
    ));
    bed.set_pod_creation_time("default", "warm-new", &rfc3339(now_plus(-60)));
    bed.handle()
        .set_pod_ready("default", "warm-new", false)
        .expect("not ready");
    bed.load(WS);
    bed.start_all();
    let vip = vip(&bed, "warm");
    wait_for_weights(&bed, vip, "the old pod alone", |w| w.len() == 1);
    // It becomes ready now: the agent sees the transition, and ramps from there.
    bed.handle()
        .set_pod_ready("default", "warm-new", true)
        .expect("ready");
    // The new pod's weight over the old one's, at most 1: when the ramp ends
    // both drop from ×100 to ×1, the old one's (lower address) written first.
    let share = |w: &BTreeMap<String, u32>| -> Option<f64> {
        let (new, old) = (*w.get("warm-new")?, *w.get("warm-old")?);
        (old > 0).then(|| (f64::from(new) / f64::from(old)).min(1.0))
    };
    wait_for_weights(&bed, vip, "the new pod warming", |w| {
        share(w).is_some_and(|s| s < 1.0)
    });
    let started = Instant::now();
    let mut samples: Vec<(f64, f64)> = Vec::new();
    let mut restarted = false;
    while started.elapsed() < Duration::from_secs(40) {
        if let Some(s) = share(&weights_by_pod(&bed, vip)) {
            samples.push((started.elapsed().as_secs_f64(), s));
        }
        if !restarted && started.elapsed() > Duration::from_secs(10) {
            // Mid-ramp: the restarted agent counts the pod as ready since its
            // creation (60 s before it became ready): higher, never lower.
            bed.kill("agent");
            bed.start_agent();
            restarted = true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "slow start across an agent restart at 10 s: (seconds, share of a warm pod's weight) {samples:?}"
    );
    for pair in samples.windows(2) {
        assert!(
            pair[1].1 >= pair[0].1 - 1e-9,
            "the warming pod's share fell from {} to {} at {:.1} s",
            pair[0].1,
            pair[1].1,
            pair[1].0
        );
    }
    let before_restart = samples
        .iter()
        .filter(|(t, _)| *t < 10.0)
        .map(|(_, s)| *s)
        .fold(0.0, f64::max);
    let after_restart = samples.last().map(|(_, s)| *s).unwrap_or(0.0);
    assert!(
        after_restart > before_restart,
        "no progress across the restart: {before_restart} then {after_restart}"
    );
}

// ---- versions side by side, and configs refused before evaluation (issue 21) ----

/// `web_ws` at `spec.policy.version` `version`.
fn web_ws_at(name: &str, policy: &str, version: &str, config: &str) -> String {
    web_ws(name, policy, config).replace(
        &format!("policy: {{name: {policy}, config"),
        &format!("policy: {{name: {policy}, version: \"{version}\", config"),
    )
}

#[test]
fn two_versions_of_a_policy_serve_side_by_side_and_a_refused_config_is_never_evaluated() {
    // `canary` is label-selector (prod 10, canary 1); `canary` at 0.1.0 is
    // prefer-local (local prod 100, remote canary 1). Both describe themselves
    // as 0.1.0, the workspace's version, as `canary.0.1.0.wasm` must.
    let (v1, v2) = (module("label-selector"), module("prefer-local"));
    let mut dir = ConfigMapDir::new(&[("canary.wasm", v1), ("canary.0.1.0.wasm", v2)]).expect("a policy directory");
    let mut bed = Testbed::new(TestbedConfig { policy_dir: Some(dir.path().to_path_buf()), ..config("wrr") });
    let pods = [
        pod_manifest("web-prod-1", &[("app", "web"), ("env", "prod")], "node-1", "10.244.9.31"),
        pod_manifest("web-prod-2", &[("app", "web"), ("env", "prod")], "node-1", "10.244.9.32"),
        pod_manifest("web-canary-1", &[("app", "web"), ("env", "canary")], "node-2", "10.244.9.33"),
    ];
    bed.load(&pods.concat());
    bed.load(&(web_ws("old", "canary", "{}") + &web_ws_at("new", "canary", "0.1.0", "{}")));
    bed.start_all();
    let (old, new) = (vip(&bed, "old"), vip(&bed, "new"));
    let split = |prod: u32| move |w: &BTreeMap<String, u32>| w.len() == 3 && w.iter().all(|(pod, w)| *w == if pod.contains("canary") { 1 } else { prod });
    wait_for_weights(&bed, old, "the unversioned module's weights", split(10));
    let new_weights = wait_for_weights(&bed, new, "version 0.1.0's weights, at the same time", split(100));
    let status = wait_for_status(&bed, "new", "the version in the status", |s| s["policy"]["version"] == "0.1.0");
    assert_eq!(status["policy"]["name"], "canary", "{status}");
    assert_eq!(weights_by_pod(&bed, old).values().max(), Some(&10), "the other WeightedService keeps its version");

    // Moving one WeightedService over: its weights follow, the other's stay.
    patch_ws(&bed, "old", json!({"spec": {"policy": {"version": "0.1.0"}}}));
    let moved = wait_for_weights(&bed, old, "old on version 0.1.0", split(100));

    // A version that is not there: PolicyNotFound, never another version; the last good weights stay.
    patch_ws(&bed, "old", json!({"spec": {"policy": {"version": "9"}}}));
    let status = wait_for_status(&bed, "old", "PolicyNotFound", |s| {
        condition(s, "PolicyReady").is_some_and(|c| c["reason"] == "PolicyNotFound")
    });
    assert!(message(&status).contains("canary.9"), "{status}");
    assert_weights_hold(&bed, old, &moved, Duration::from_secs(2));

    // A file whose module describes another version than its name's: refused.
    dir.update(&[("canary.wasm", v1), ("canary.0.1.0.wasm", v2), ("canary.2.wasm", v1)]).expect("updating the policy directory");
    patch_ws(&bed, "old", json!({"spec": {"policy": {"version": "2"}}}));
    let status = wait_for_status(&bed, "old", "the version mismatch refused", |s| {
        condition(s, "PolicyReady").is_some_and(|c| c["reason"] == "PolicyModuleRefused")
    });
    assert!(message(&status).contains("says it is version \"0.1.0\""), "{status}");
    assert_weights_hold(&bed, old, &moved, Duration::from_secs(2));

    // A config the policy refuses: the controller reports it with its JSON
    // path, and no agent evaluates with it (its evaluation counter stays 0).
    patch_ws(&bed, "new", json!({"spec": {"policy": {"name": "gradual-rollout", "version": null,
        "config": {"canary": {"env": "canary"}, "steps": [{"share": 10}, {"share": 100}]}}}}));
    let status = wait_for_status(&bed, "new", "PolicyConfigInvalid", |s| {
        condition(s, "PolicyReady").is_some_and(|c| c["reason"] == "PolicyConfigInvalid")
    });
    let why = condition(&status, "PolicyReady").and_then(|c| c["message"].as_str()).unwrap_or("").to_string();
    assert!(why.contains("$.steps[0].hold"), "{why}");
    eprintln!("refused config: {why}");
    wait_until(TIMEOUT, "the agent's refusal counted", || {
        (bed.agent_metric("ipvs_operator_policy_config_refusals_total", "policy=\"gradual-rollout\"")? >= 1.0).then_some(())
    });
    let evaluations = bed.agent_metric("ipvs_operator_policy_evaluations_total", "policy=\"gradual-rollout\"").unwrap_or(0.0);
    assert_eq!(evaluations, 0.0, "the agent evaluated a config the policy refuses");
    assert_weights_hold(&bed, new, &new_weights, Duration::from_secs(2));

    // Fixed: evaluated (a 10 % canary: one canary endpoint against two prod).
    patch_ws(&bed, "new", json!({"spec": {"policy": {"config": {"canary": {"env": "canary"}, "steps": [{"share": 10, "hold": "1h"}, {"share": 100}]}}}}));
    wait_for_status(&bed, "new", "the fixed config evaluated", |s| {
        condition(s, "PolicyReady").is_some_and(|c| c["status"] == "True")
    });
}

// ---- the shipped binary (issue 22) ----

#[test]
fn the_release_binary_takes_binary_components_and_refuses_wat_text() {
    // A component exporting the evaluator with the wrong signature: the
    // binary form gets as far as the interface check; the text form must not
    // even be parsed (wasmtime's `wat` feature is for our tests only). This
    // runs target/release's binary, which `cargo build --release` made: the
    // tests' own builds turn dev features on.
    let text = format!(
        r#"(component
            (core module $m (func (export "f") (result i32) i32.const 1))
            (core instance $i (instantiate $m))
            (func $f (result u32) (canon lift (core func $i "f")))
            (instance $e (export "evaluate" (func $f)))
            (export "ipvs-operator:policy/evaluator@{}" (instance $e)))"#,
        ipvs_operator::policy::served_interfaces()[0]
    );
    let dir = tempfile::tempdir().expect("a temp dir");
    let (as_text, as_binary) = (dir.path().join("text.wasm"), dir.path().join("binary.wasm"));
    std::fs::write(&as_text, &text).expect("write");
    std::fs::write(&as_binary, wat::parse_str(&text).expect("valid WAT")).expect("write");
    let describe = |file: &std::path::Path| {
        let binary = ipvs_operator_tests::project_binary("ipvs-operator").expect("the binary");
        let out = std::process::Command::new(binary)
            .args(["policy", "describe", "--policy-compiler", "in-process", "--policy-file"])
            .arg(file)
            .output()
            .expect("run ipvs-operator");
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let binary = describe(&as_binary);
    assert!(binary.contains("does not export"), "the binary component reaches the interface check: {binary}");
    let text = describe(&as_text);
    assert!(text.contains("does not compile") && !text.contains("does not export"), "WAT text is refused unparsed: {text}");
}
