//! `ipvs-operator eval` as a user runs it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ipvs_operator::eval::Report;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn eval(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ipvs-operator"))
        .arg("eval")
        .args(args)
        .output()
        .expect("run ipvs-operator")
}

fn seed_args() -> Vec<String> {
    vec![
        "--weighted-service".into(),
        repo("examples/seed-canary.yaml").display().to_string(),
        "--pods".into(),
        repo("examples/seed-canary-pods.yaml").display().to_string(),
    ]
}

fn json_report(out: &Output) -> Report {
    assert!(out.status.success(), "eval failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("eval -o json prints a report")
}

#[test]
fn the_seed_example_gives_prod_10_and_canary_1_through_the_named_port() {
    let mut args = seed_args();
    args.extend(["-o".into(), "json".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let report = json_report(&eval(&args));
    assert_eq!(report.policy.name, "label-selector");
    assert_eq!(report.weights.len(), 6);
    for row in &report.weights {
        let expected = if row.pod.contains("prod") { 10 } else { 1 };
        assert_eq!(row.weight, expected, "{row:?}");
        assert_eq!((row.port, row.service_port, row.protocol.as_str()), (8080, 80, "TCP"), "{row:?}");
    }
    let pods: Vec<&str> = report.weights.iter().map(|r| r.pod.as_str()).collect();
    let mut sorted = pods.clone();
    sorted.sort();
    assert_eq!(pods, sorted, "rows are sorted by pod");
    assert!((report.groups[0].share - 30.0 / 33.0).abs() < 1e-9);
}

#[test]
fn the_table_is_for_people() {
    let args = seed_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = eval(&args);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("nginx-prod-1") && text.contains("90.9%"), "{text}");
}

#[test]
fn a_policy_file_can_be_evaluated() {
    let wasm = Path::new(env!("OUT_DIR")).join("label_selector.wasm");
    let mut args = seed_args();
    args.extend(["--policy-file".into(), wasm.display().to_string(), "-o".into(), "json".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let report = json_report(&eval(&args));
    assert_eq!(report.policy.name, "label_selector");
    assert_eq!(report.weights.iter().filter(|r| r.weight == 10).count(), 3);
}

/// The controller and agent compile in a child process (`compile-policy`),
/// `eval` too by default: the same module compiled either way decides the
/// same, and one that does not compile is the same single error.
#[test]
fn a_policy_compiled_in_a_child_decides_as_one_compiled_in_process() {
    let wasm = Path::new(env!("OUT_DIR")).join("label_selector.wasm");
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.wasm");
    std::fs::write(&garbage, b"\0asm\x0d\0\x01\0not a component").unwrap();
    let mut reports = Vec::new();
    for compiler in ["subprocess", "in-process"] {
        let mut args = seed_args();
        args.extend(["--policy-compiler".into(), compiler.into(), "-o".into(), "json".into()]);
        let mut with_file = args.clone();
        with_file.extend(["--policy-file".into(), wasm.display().to_string()]);
        let with_file: Vec<&str> = with_file.iter().map(String::as_str).collect();
        reports.push(serde_json::to_value(json_report(&eval(&with_file))).unwrap());

        args.extend(["--policy-file".into(), garbage.display().to_string()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        fails_with(&args, "policy \"garbage\" does not compile:");
    }
    assert_eq!(reports[0], reports[1]);
}

fn fails_with(args: &[&str], expected: &str) {
    let out = eval(args);
    assert!(!out.status.success(), "expected failure, got: {}", String::from_utf8_lossy(&out.stdout));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert_eq!(stderr.lines().filter(|l| l.starts_with("error")).count(), 1, "one error: {stderr}");
    assert!(stderr.contains(expected), "expected {expected:?} in: {stderr}");
}

#[test]
fn a_missing_file_is_one_clear_error() {
    let ws = repo("examples/seed-canary.yaml").display().to_string();
    fails_with(&["--weighted-service", &ws, "--pods", "/nonexistent/pods.yaml"], "/nonexistent/pods.yaml: No such file");
}

#[test]
fn a_yaml_error_names_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "apiVersion: v1\nkind: List\nitems: [\n").unwrap();
    let ws = repo("examples/seed-canary.yaml").display().to_string();
    // Where the bracket that is never closed opens.
    fails_with(&["--weighted-service", &ws, "--pods", bad.to_str().unwrap()], "line 3 column 8: unclosed bracket");
}

#[test]
fn an_unknown_policy_is_one_clear_error() {
    let mut args = seed_args();
    args.extend(["--policy".into(), "nope".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    fails_with(&args, "unknown policy \"nope\"");
}

#[test]
fn a_failing_policy_is_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path().join("ws.yaml");
    let text = std::fs::read_to_string(repo("examples/seed-canary.yaml")).unwrap()
        + "  policy:\n    config:\n      defaultWeight: lots\n";
    std::fs::write(&ws, text).unwrap();
    let pods = repo("examples/seed-canary-pods.yaml").display().to_string();
    fails_with(&["--weighted-service", ws.to_str().unwrap(), "--pods", &pods], "defaultWeight");
}

#[test]
fn a_sha256_pin_that_does_not_match_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path().join("ws.yaml");
    let text = std::fs::read_to_string(repo("examples/seed-canary.yaml")).unwrap()
        + &format!("  policy:\n    sha256: {}\n", "0".repeat(64));
    std::fs::write(&ws, text).unwrap();
    let pods = repo("examples/seed-canary-pods.yaml").display().to_string();
    fails_with(&["--weighted-service", ws.to_str().unwrap(), "--pods", &pods], "pins 0000");
}
