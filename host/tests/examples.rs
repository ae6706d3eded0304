//! The manifests in examples/, evaluated with `ipvs-operator eval` as a user
//! would: one WeightedService per built-in policy, and the custom policy crate
//! in examples/custom-policy, built for wasm32-wasip2 and loaded from its file.

use std::path::{Path, PathBuf};
use std::process::Command;

use ipvs_operator::eval::Report;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// `ipvs-operator eval -o json` on `examples/NAME.yaml` and `examples/NAME-pods.yaml`.
fn eval(name: &str, extra: &[&str]) -> Report {
    let ws = repo(&format!("examples/{name}.yaml"));
    let pods = repo(&format!("examples/{name}-pods.yaml"));
    run_eval(&ws, &pods, extra)
}

fn run_eval(ws: &Path, pods: &Path, extra: &[&str]) -> Report {
    let out = Command::new(env!("CARGO_BIN_EXE_ipvs-operator"))
        .arg("eval")
        .arg("--weighted-service")
        .arg(ws)
        .arg("--pods")
        .arg(pods)
        .args(["-o", "json"])
        .args(extra)
        .output()
        .expect("run ipvs-operator");
    assert!(out.status.success(), "eval failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("eval -o json prints a report")
}

/// Weight per pod name.
fn weights(report: &Report) -> Vec<(String, u16)> {
    report.weights.iter().map(|r| (r.pod.clone(), r.weight)).collect()
}

fn weight_of(report: &Report, pod: &str) -> u16 {
    report.weights.iter().find(|r| r.pod == pod).unwrap_or_else(|| panic!("no pod {pod}")).weight
}

/// The share of new connections of the group whose selector reads `selector`.
fn share_of(report: &Report, selector: &str) -> f64 {
    report.groups.iter().find(|g| g.selector == selector).unwrap_or_else(|| panic!("no group {selector}")).share
}

#[test]
fn label_selector_in_share_mode_gives_canary_ten_percent_of_four_plus_one_pods() {
    let report = eval("label-selector-share", &[]);
    assert_eq!(report.policy.name, "label-selector");
    assert_eq!(weight_of(&report, "shop-canary-1"), 4);
    for i in 1..=4 {
        assert_eq!(weight_of(&report, &format!("shop-prod-{i}")), 9);
    }
    assert!((share_of(&report, "env=canary") - 0.10).abs() < 1e-12, "{:?}", report.groups);
    assert_eq!(report.message.as_deref(), Some("env=prod 90 % (4 × 9), env=canary 10 % (1 × 4); exact"));
}

#[test]
fn the_gradual_rollout_steps_from_the_oldest_canary_pods_creation() {
    // The first canary pod was created at 10:00:00.
    for (now, canary, requeue, message) in [
        ("2026-11-26T10:05:00Z", 0.05, Some(300.0), "step 1/4: canary 5 %, next in 5m"),
        ("2026-11-26T10:15:00Z", 0.25, Some(900.0), "step 2/4: canary 25 %, next in 15m"),
        ("2026-11-26T10:59:59Z", 0.50, Some(1.0), "step 3/4: canary 50 %, next in 1s"),
        ("2026-11-26T11:00:00Z", 1.00, None, "step 4/4: canary 100 %, rollout complete"),
    ] {
        let report = eval("gradual-rollout", &["--now", now]);
        assert_eq!(report.policy.name, "gradual-rollout");
        let got = share_of(&report, "track=canary");
        assert!((got - canary).abs() < 1e-12, "at {now}: canary {got}: {:?}", weights(&report));
        assert_eq!(report.requeue_after_seconds, requeue, "at {now}");
        assert_eq!(report.message.as_deref(), Some(message), "at {now}");
    }
    // 25 % to 2 canaries against 3 stable pods: 1 : 2 per pod.
    let report = eval("gradual-rollout", &["--now", "2026-11-26T10:15:00Z"]);
    assert_eq!(weight_of(&report, "checkout-canary-1"), 1);
    assert_eq!(weight_of(&report, "checkout-stable-1"), 2);
}

#[test]
fn slow_start_warms_up_the_new_pod() {
    let report = eval("slow-start", &["--now", "2026-11-26T10:00:30Z"]);
    assert_eq!(report.policy.name, "slow-start");
    // 30 s into a 2 minute window: 25 % of the full weight (×100 while warming).
    assert_eq!(weights(&report), [("api-1", 100), ("api-2", 100), ("api-3", 100), ("api-4", 25)].map(|(p, w)| (p.to_string(), w)));
    assert_eq!(report.requeue_after_seconds, Some(6.0));
    let warm = eval("slow-start", &["--now", "2026-11-26T10:02:00Z"]);
    assert!(warm.weights.iter().all(|r| r.weight == 1), "{:?}", weights(&warm));
    assert_eq!(warm.requeue_after_seconds, None);
    assert_eq!(warm.message.as_deref(), Some("all endpoints warm"));
}

#[test]
fn prefer_local_depends_on_the_evaluating_node() {
    let on_a1 = eval("prefer-local", &["--node", "node-a1"]);
    assert_eq!(on_a1.policy.name, "prefer-local");
    let expected = |w: [u16; 4]| -> Vec<(String, u16)> { (1..=4).map(|i| (format!("cache-{i}"), w[i - 1])).collect() };
    assert_eq!(weights(&on_a1), expected([100, 10, 1, 1]));
    assert_eq!(weights(&eval("prefer-local", &["--node", "node-b1"])), expected([1, 1, 100, 100]));
    // The controller's cluster-wide view: every pod is remote.
    assert_eq!(weights(&eval("prefer-local", &[])), expected([1, 1, 1, 1]));
}

#[test]
fn the_custom_policy_example_builds_for_wasm_and_evaluates_from_its_file() {
    // As docs/policies.md says to build it. A target directory of its own: the
    // outer cargo holds the lock on the shared one while tests run.
    let target_dir = repo("target/examples");
    let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cargo
        .current_dir(repo("examples/custom-policy"))
        .args(["build", "--quiet", "--release", "--target", "wasm32-wasip2", "--target-dir"])
        .arg(&target_dir);
    // The outer build's flags are for the host, not for wasm.
    for var in ["RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS", "CARGO_BUILD_TARGET", "CARGO_TARGET_DIR", "CARGO_BUILD_RUSTFLAGS"] {
        cargo.env_remove(var);
    }
    let out = cargo.output().expect("run cargo");
    assert!(out.status.success(), "building the example failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let wasm = target_dir.join("wasm32-wasip2/release/pod_label_weight.wasm");

    let report = run_eval(
        &repo("examples/custom-policy/weighted-service.yaml"),
        &repo("examples/custom-policy/pods.yaml"),
        &["--policy-file", wasm.to_str().expect("a UTF-8 path")],
    );
    assert_eq!(report.policy.name, "pod_label_weight");
    assert_eq!(
        weights(&report),
        [("render-large", 4), ("render-medium", 2), ("render-small", 1)].map(|(p, w)| (p.to_string(), w))
    );
    assert_eq!(report.message.as_deref(), Some("2 of 3 weighted by weight.example.com/value"));

    // Its case file, against the built module.
    let (ok, out) = policy_test(&["--policy-file", wasm.to_str().expect("a UTF-8 path"), "examples/custom-policy/cases.yaml"]);
    assert!(ok && out.ends_with("2 passed, 0 failed\n"), "{out}");
}

/// `ipvs-operator policy test ARGS…` from the repository's root: whether it
/// succeeded, and what it printed.
fn policy_test(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ipvs-operator"))
        .current_dir(repo(""))
        .args(["policy", "test"])
        .args(args)
        .output()
        .expect("run ipvs-operator");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

#[test]
fn every_built_in_policy_passes_its_case_file() {
    for (policy, cases) in [("label-selector", 5), ("gradual-rollout", 4), ("slow-start", 4), ("prefer-local", 3)] {
        let file = format!("policies/{policy}/cases.yaml");
        let (ok, out) = policy_test(&["--policy", policy, &file]);
        assert!(ok, "{policy}: {out}");
        assert!(out.contains(&format!("{cases} passed, 0 failed")), "{policy}: {out}");
    }
}

#[test]
fn a_failing_case_is_named_and_counted_and_fails_the_command() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let file = dir.path().join("cases.yaml");
    let cases = std::fs::read_to_string(repo("policies/label-selector/cases.yaml")).expect("the case file");
    // The first case, expecting a weight the policy does not give.
    let wrong = cases.replacen("expect: {web-stable-1: 9, web-stable-2: 9, web-canary-1: 1}", "expect: {web-stable-1: 9, web-stable-2: 9, web-canary-1: 7}", 1);
    assert_ne!(wrong, cases);
    std::fs::write(&file, wrong).expect("write");
    let (ok, out) = policy_test(&["--policy", "label-selector", file.to_str().expect("a UTF-8 path")]);
    assert!(!ok, "{out}");
    assert!(out.contains("FAIL ") && out.contains("web-canary-1: 1, expected 7"), "{out}");
    assert!(out.contains("4 passed, 1 failed"), "{out}");
    // An error expected where the policy gives weights, and a file that is not a case file.
    std::fs::write(&file, cases.replacen("  expect: {web-stable-1: 9, web-stable-2: 9, web-canary-1: 1}", "  expectError: nope", 1)).expect("write");
    let (ok, out) = policy_test(&["--policy", "label-selector", file.to_str().expect("a UTF-8 path")]);
    assert!(!ok && out.contains("expected an error containing \"nope\""), "{out}");
    std::fs::write(&file, "cases: [{name: x, weightedService: {metadata: {name: w}, spec: {}}, expect: {}, expectError: y}]").expect("write");
    let (ok, out) = policy_test(&["--policy", "label-selector", file.to_str().expect("a UTF-8 path")]);
    assert!(!ok && out.contains("give exactly one of expect and expectError"), "{out}");
}

/// `ipvs-operator policy ARGS…`: whether it succeeded, and what it printed.
fn policy(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ipvs-operator"))
        .current_dir(repo(""))
        .arg("policy")
        .args(args)
        .output()
        .expect("run ipvs-operator");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

#[test]
fn policy_describe_validate_and_list_answer_from_the_modules_themselves() {
    let (ok, out) = policy(&["describe", "--policy", "gradual-rollout"]);
    assert!(ok, "{out}");
    for line in ["name: gradual-rollout", "version: 0.1.0", &format!("interface: {}", ipvs_policy_sdk::INTERFACE_VERSION)] {
        assert!(out.lines().any(|l| l == line), "no line {line:?}: {out}");
    }
    assert!(out.contains("config schema:") && out.contains("\"canary\""), "{out}");

    let bad = r#"{"canary": {"track": "canary"}, "steps": [{"share": 10}, {"share": 100}]}"#;
    let (ok, out) = policy(&["validate", "--policy", "gradual-rollout", "--config", bad]);
    assert!(!ok, "{out}");
    assert!(out.starts_with("$.steps[0].hold: missing"), "{out}");
    let (ok, out) = policy(&["validate", "--policy", "label-selector", "--config", r#"{"mode": "share"}"#]);
    assert!(ok && out == "ok\n", "{out}");

    // A directory with a policy at two versions, one of them lying about its
    // version, and a module built against interface 0.1.
    let dir = tempfile::tempdir().expect("a temp dir");
    let label_selector = ipvs_operator::policy::embedded_module("label-selector").expect("built in");
    std::fs::write(dir.path().join("canary.wasm"), label_selector).expect("write");
    std::fs::write(dir.path().join("canary.0.1.0.wasm"), label_selector).expect("write");
    std::fs::write(dir.path().join("canary.2.wasm"), label_selector).expect("write");
    std::fs::copy(repo("host/tests/fixtures/label-selector-interface-0.1.0.wasm"), dir.path().join("old.wasm")).expect("copy");
    let (ok, out) = policy(&["list", "--policy-dir", dir.path().to_str().expect("a UTF-8 path")]);
    assert!(ok, "{out}");
    let row = |name: &str, version: &str| {
        out.lines()
            .find(|l| l.split_whitespace().take(2).eq([name, version]))
            .unwrap_or_else(|| panic!("no row {name} {version}: {out}"))
            .to_string()
    };
    assert!(row("canary", "0.1.0").contains(" 0.2.0 "), "{out}");
    assert!(row("canary", "2").contains("REFUSED") && row("canary", "2").contains("says it is version \"0.1.0\""), "{out}");
    assert!(row("old", "-").contains(" 0.1.0 ") && row("old", "-").contains("no description"), "{out}");
    assert!(row("prefer-local", "0.1.0").contains("built-in"), "{out}");

    let (ok, out) = policy(&["describe", "--policy-file", "host/tests/fixtures/label-selector-interface-0.1.0.wasm"]);
    assert!(ok && out.contains("interface: 0.1.0") && out.contains("does not describe itself"), "{out}");
}
