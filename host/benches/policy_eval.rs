//! Benchmark `policy-eval`: the label-selector policy over 10,000 endpoints
//! (100 distinct label sets, 4 groups), evaluated through wasm the way the agent
//! does it (a fresh instance per evaluation, input passing and checks included),
//! against the same policy compiled natively into this benchmark, fed the same
//! input in the same run. Also: what one instantiation costs, and what reusing
//! one instance would save.
//!
//! Writes `target/bench/policy-eval.json`; `ratio` = wasm / native.

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use ipvs_operator::crd::WeightGroup;
use ipvs_operator::policy::{Catalog, EngineConfig, PolicyEngine};
use ipvs_operator::snapshot::{Endpoint, Labels, ServiceMeta, Snapshot};
use ipvs_policy_sdk::Policy;
use k8s_openapi::jiff::Timestamp;

const ENDPOINTS: usize = 10_000;
const LABEL_SETS: usize = 100;
const ROUNDS: usize = 40;

fn snapshot() -> Snapshot {
    let label_set = |i: usize| -> Labels {
        [
            ("app".to_string(), "shop".to_string()),
            ("env".to_string(), ["prod", "canary", "staging", "dev"][i % 4].to_string()),
            ("zone".to_string(), format!("zone-{}", i % 5)),
            ("version".to_string(), format!("v{}", i % 25)),
            ("pod-template-hash".to_string(), format!("{:08x}", i * 2_654_435_761 % 4_294_967_291)),
        ]
        .into()
    };
    // Pods of one ReplicaSet share one label map, as the agent's snapshots do.
    let sets: Vec<std::sync::Arc<Labels>> = (0..LABEL_SETS).map(|i| std::sync::Arc::new(label_set(i))).collect();
    let group = |weight: u32, pairs: &[(&str, &str)]| WeightGroup {
        weight,
        selector: pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
    };
    Snapshot {
        service: ServiceMeta {
            namespace: "shop".into(),
            name: "frontend".into(),
            selector: [("app".to_string(), "shop".to_string())].into(),
            ..Default::default()
        },
        groups: vec![
            group(100, &[("env", "prod")]),
            group(10, &[("env", "canary")]),
            group(50, &[("env", "prod"), ("zone", "zone-1")]),
            group(5, &[("version", "v7")]),
        ],
        config: r#"{"defaultWeight": 2}"#.into(),
        endpoints: (0..ENDPOINTS)
            .map(|i| Endpoint {
                pod_name: Some(format!("frontend-{i:05}")),
                address: format!("10.{}.{}.{}", 1 + i / 65536, (i / 256) % 256, i % 256).parse().unwrap(),
                node_name: Some(format!("node-{}", i % 50)),
                zone: Some(format!("zone-{}", i % 5)),
                labels: sets[i % LABEL_SETS].clone(),
                ready: i % 97 != 0,
                serving: true,
                terminating: i % 97 == 0,
                created: Some(Timestamp::UNIX_EPOCH),
                ready_since: Some(Timestamp::UNIX_EPOCH),
                ports: vec![],
                hints: Default::default(),
            })
            .collect(),
        node: None,
        now: Timestamp::UNIX_EPOCH,
    }
}

/// The same input, as the SDK's types, for the native run: the conversion is
/// part of the measured work on both sides.
fn to_sdk(s: &Snapshot) -> ipvs_policy_sdk::Input {
    use ipvs_policy_sdk as sdk;
    let labels = |m: &Labels| -> Vec<sdk::Label> {
        m.iter().map(|(k, v)| sdk::Label { key: k.clone(), value: v.clone() }).collect()
    };
    let mut set_of = std::collections::HashMap::new();
    let mut sets: Vec<&Labels> = Vec::new();
    for e in &s.endpoints {
        set_of.entry(std::sync::Arc::as_ptr(&e.labels)).or_insert_with(|| {
            sets.push(&e.labels);
            (sets.len() - 1) as u32
        });
    }
    // Interned the way the host does it: borrowed keys, one entry per distinct node.
    let mut location_of: std::collections::HashMap<(&str, Option<&str>), u32> = std::collections::HashMap::new();
    let mut locations = Vec::new();
    let endpoint_locations: Vec<Option<u32>> = s
        .endpoints
        .iter()
        .map(|e| {
            let node = e.node_name.as_deref()?;
            Some(*location_of.entry((node, e.zone.as_deref())).or_insert_with(|| {
                locations.push(sdk::Location { node_name: node.to_string(), zone: e.zone.clone() });
                (locations.len() - 1) as u32
            }))
        })
        .collect();
    let ts = |t: Timestamp| sdk::Timestamp { seconds: t.as_second(), nanos: t.subsec_nanosecond() as u32 };
    sdk::Input {
        service: sdk::Service {
            namespace: s.service.namespace.clone(),
            name: s.service.name.clone(),
            selector: labels(&s.service.selector),
            labels: labels(&s.service.labels),
            annotations: labels(&s.service.annotations),
        },
        groups: s.groups.iter().map(|g| sdk::WeightGroup { weight: g.weight, selector: labels(&g.selector) }).collect(),
        config: s.config.clone(),
        label_sets: sets.iter().map(|l| labels(l)).collect(),
        locations,
        endpoints: s
            .endpoints
            .iter()
            .zip(endpoint_locations)
            .map(|(e, location)| sdk::Endpoint {
                pod_name: e.pod_name.clone(),
                address: e.address.to_string(),
                location,
                label_set: set_of[&std::sync::Arc::as_ptr(&e.labels)],
                conditions: {
                    let mut c = sdk::Conditions::empty();
                    c.set(sdk::Conditions::READY, e.ready);
                    c.set(sdk::Conditions::SERVING, e.serving);
                    c.set(sdk::Conditions::TERMINATING, e.terminating);
                    c
                },
                created: e.created.map(ts),
                ready_since: e.ready_since.map(ts),
            })
            .collect(),
        node: None,
        now: ts(s.now),
    }
}

fn native(s: &Snapshot) -> Vec<u16> {
    let input = to_sdk(s);
    let decision = label_selector::LabelSelector::evaluate(&input).expect("native evaluation");
    let ready: Vec<bool> = input.endpoints.iter().map(ipvs_policy_sdk::Endpoint::is_ready).collect();
    ipvs_policy_sdk::validate::check(&decision.weights, &ready, false).expect("valid");
    decision.weights.iter().map(|w| *w as u16).collect()
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn time<T>(rounds: usize, mut f: impl FnMut() -> T) -> Duration {
    black_box(f()); // warm-up
    median(
        (0..rounds)
            .map(|_| {
                let started = Instant::now();
                black_box(f());
                started.elapsed()
            })
            .collect(),
    )
}

fn main() {
    let snapshot = snapshot();
    let catalog = Catalog::builtin(PolicyEngine::new(EngineConfig {
        // 10,000 endpoints take longer than the agent's default budget under load;
        // the benchmark measures cost, not the limit.
        timeout: Duration::from_secs(10),
        ..Default::default()
    })
    .expect("engine"));
    let compile_started = Instant::now();
    let policy = catalog.get("label-selector").expect("built-in policy");
    let compile = compile_started.elapsed();

    let wasm_weights = policy.evaluate(&snapshot).expect("wasm evaluation").weights;
    assert_eq!(wasm_weights, native(&snapshot), "wasm and native disagree");

    let mut native_times = Vec::new();
    let mut wasm_times = Vec::new();
    // Interleave so both sides see the same machine conditions.
    for _ in 0..5 {
        native_times.push(time(ROUNDS / 5, || native(&snapshot)));
        wasm_times.push(time(ROUNDS / 5, || policy.evaluate(&snapshot).expect("wasm evaluation")));
    }
    let native_t = median(native_times);
    let wasm_t = median(wasm_times);
    let reused = policy.measure_reused_instance(&snapshot, 5).expect("reused instance");
    let instantiate = policy.measure_instantiation(1000).expect("instantiation");
    let empty = Snapshot { endpoints: vec![], ..snapshot.clone() };
    let small_call = time(1000, || policy.evaluate(&empty).expect("empty evaluation"));

    let ratio = wasm_t.as_secs_f64() / native_t.as_secs_f64();
    let us = |d: Duration| (d.as_secs_f64() * 1e6 * 10.0).round() / 10.0;
    let report = serde_json::json!({
        "name": "policy-eval",
        "ours": us(wasm_t),
        "baseline": us(native_t),
        "unit": "µs per evaluation of 10,000 endpoints (wasm, fresh instance, vs native)",
        "ratio": (ratio * 1000.0).round() / 1000.0,
        "n": ENDPOINTS,
        "instantiateMicros": us(instantiate),
        "emptyEvaluationMicros": us(small_call),
        "reusedInstanceMicros": us(reused),
        "compileMillis": (compile.as_secs_f64() * 1e4).round() / 10.0,
    });
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir).expect("create target/bench");
    let path = dir.join("policy-eval.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report).expect("json") + "\n").expect("write report");
    println!("{}", serde_json::to_string_pretty(&report).expect("json"));
    println!(
        "policy-eval: wasm {:.0} µs vs native {:.0} µs per 10,000-endpoint evaluation: ratio {ratio:.2} (goal ≤ 2.0); \
         one instantiation {:.1} µs, a reused instance would take {:.0} µs",
        us(wasm_t),
        us(native_t),
        us(instantiate),
        us(reused)
    );
}
