//! Hostile policy modules: each is refused with its own reason, within its
//! limit, through `eval --policy-file` and from a ConfigMap-style policy
//! directory, while the process stays up and small and the other policies keep
//! working. (The agent with the same modules, in the VM, against the kernel:
//! tests/tests/e2e_policies.rs.) The memory bound is checked in this process,
//! which loads them all: a child's peak RSS from `wait4` would count the
//! forking test process's own.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipvs_operator::policy::{
    Catalog, CatalogEvent, CompileLimits, Compiler, EngineConfig, PolicyEngine, PolicyError,
    embedded_module,
};
use policy_fixtures::hostile;

/// The agent's container limit (deploy/agent.yaml): no hostile module may
/// take a process past it.
const CONTAINER_LIMIT_KIB: i64 = 192 << 10;

/// A compile bound short enough for a test, long enough for any real module
/// on a busy machine.
const COMPILE_TIMEOUT: Duration = Duration::from_secs(10);

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// Every hostile module: (file name, bytes, what its refusal must say).
fn hostile_modules() -> Vec<(&'static str, Vec<u8>, &'static [&'static str])> {
    vec![
        (
            "instances",
            hostile::many_instances(8, 60),
            &["exceeds the sandbox's limits", "core module instances"],
        ),
        (
            "data",
            hostile::huge_data_segment(),
            &["exceeds the sandbox's limits", "memory"],
        ),
        (
            "fill",
            hostile::memory_fill(1 << 30),
            &["trapped", "out of bounds"],
        ),
        (
            "bomb",
            hostile::compile_bomb(),
            &["to compile and was stopped"],
        ),
        (
            "spin",
            hostile::endless_loop(),
            &["ran longer than its limit"],
        ),
        (
            "big",
            hostile::oversized(20 << 20),
            &["over the limit of 8388608 bytes"],
        ),
    ]
}

/// `ipvs-operator eval` of the seed example with `module` as the policy: its
/// output, and how long it took.
fn eval_with(module: &Path) -> (std::process::Output, Duration) {
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_ipvs-operator"))
        .arg("eval")
        .arg("--weighted-service")
        .arg(repo("examples/seed-canary.yaml"))
        .arg("--pods")
        .arg(repo("examples/seed-canary-pods.yaml"))
        .arg("--policy-file")
        .arg(module)
        .args([
            "--policy-compile-timeout",
            &format!("{}s", COMPILE_TIMEOUT.as_secs()),
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run ipvs-operator eval");
    (output, started.elapsed())
}

#[test]
fn eval_refuses_each_hostile_module_with_its_reason_within_its_limit() {
    let dir = tempfile::tempdir().expect("a temp dir");
    for (name, bytes, reasons) in hostile_modules() {
        let path = dir.path().join(format!("{name}.wasm"));
        std::fs::write(&path, &bytes).expect("writing the module");
        let (output, took) = eval_with(&path);
        let stderr = String::from_utf8_lossy(&output.stderr);
        eprintln!("{name}: {took:?}: {}", stderr.trim());
        assert_eq!(
            output.status.code(),
            Some(1),
            "{name}: eval must fail cleanly, not crash: {stderr}"
        );
        for reason in reasons {
            assert!(
                stderr.contains(reason),
                "{name}: {reason:?} not in: {stderr}"
            );
        }
        assert!(
            stderr.len() < 2048,
            "{name}: the error is not bounded: {} bytes",
            stderr.len()
        );
        assert!(
            took < COMPILE_TIMEOUT + Duration::from_secs(20),
            "{name}: refused only after {took:?}"
        );
    }
}

/// This process's peak resident memory (VmHWM), in KiB.
fn peak_rss_kib() -> i64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmHWM:")?
                    .trim()
                    .strip_suffix("kB")?
                    .trim()
                    .parse()
                    .ok()
            })
        })
        .unwrap_or(0)
}

#[test]
fn a_policy_directory_of_hostile_modules_refuses_each_and_serves_the_good_one() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let good = embedded_module("label-selector").expect("built in");
    std::fs::write(dir.path().join("good.wasm"), good).expect("writing");
    let modules = hostile_modules();
    for (name, bytes, _) in &modules {
        std::fs::write(dir.path().join(format!("{name}.wasm")), bytes).expect("writing");
    }
    // As the agent runs: compiled in a child, bounded.
    let engine = PolicyEngine::new(EngineConfig {
        compiler: Compiler::Subprocess {
            program: env!("CARGO_BIN_EXE_ipvs-operator").into(),
            args: vec![
                "compile-policy".into(),
                "--policy-memory-mib".into(),
                "64".into(),
                "--address-space-mib".into(),
                "256".into(),
            ],
        },
        compile: CompileLimits {
            timeout: COMPILE_TIMEOUT,
            address_space: 256 << 20,
        },
        ..EngineConfig::default()
    })
    .expect("an engine");
    let catalog = Arc::new(Catalog::with_dir(engine, dir.path()));
    let started = Instant::now();
    let events = catalog.rescan();
    eprintln!(
        "rescan of {} modules: {:?}",
        modules.len() + 1,
        started.elapsed()
    );
    assert!(
        started.elapsed() < COMPILE_TIMEOUT + Duration::from_secs(60),
        "refusing them took {:?}",
        started.elapsed()
    );
    for (name, _, reasons) in &modules {
        let error = events
            .iter()
            .find_map(|e| match e {
                CatalogEvent::Failed { name: n, error } if n == name => Some(error.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{name} was not refused: {events:?}"));
        eprintln!("{name}: {error}");
        for reason in *reasons {
            assert!(error.contains(reason), "{name}: {reason:?} not in: {error}");
        }
        // Refused for its own fault: held against its bytes, not retried.
        assert!(catalog.refusal(name).is_some(), "{name}");
        assert!(
            matches!(catalog.get(name), Err(PolicyError::Refused { .. })),
            "{name}"
        );
    }
    assert!(
        events
            .iter()
            .any(|e| matches!(e, CatalogEvent::Loaded { name, .. } if name == "good")),
        "{events:?}"
    );
    // Nothing is read or compiled again while nothing changes.
    let compiles = catalog.compiles();
    assert!(catalog.rescan().is_empty());
    assert_eq!(catalog.compiles(), compiles);
    assert!(
        peak_rss_kib() < CONTAINER_LIMIT_KIB,
        "this process peaked at {} MiB",
        peak_rss_kib() >> 10
    );
}
