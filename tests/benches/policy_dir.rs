//! What an idle controller pays for a policy directory: bytes read from it and
//! CPU over `POLICY_DIR_IDLE_SECONDS` (default 30) after a ConfigMap-style
//! update of `POLICY_DIR_MODULES` (default 10) modules of 1 MiB, next to the
//! same controller without `--policy-dir` (the baseline), both in the same run
//! against the test API server (a test double).
//!
//! Writes `target/bench/policy-dir.json`: `ours` and `baseline` are the idle
//! CPU in % of one core; the bytes each read (`/proc/PID/io` rchar: files and
//! sockets) and the bytes read from policy modules
//! (`ipvs_operator_policy_dir_read_bytes_total`, goal 0) are beside them.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ipvs_operator::policy::embedded_module;
use ipvs_operator_tests::apiserver::{Config, TestApiServer, kubeconfig_yaml};
use ipvs_operator_tests::policy_dir::{ConfigMapDir, with_custom_section};
use ipvs_operator_tests::procstat::{clock_ticks_per_second, cpu_ticks};

mod process;
use process::{Process, env_number, sample};


/// Bytes process `pid` has read (`rchar` of `/proc/PID/io`).
fn read_chars(pid: u32) -> Result<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io"))?;
    let line = io
        .lines()
        .find_map(|l| l.strip_prefix("rchar:"))
        .context("rchar in /proc/PID/io")?;
    Ok(line.trim().parse()?)
}

/// `modules` label-selector components of about 1 MiB each, `p0.wasm`…,
/// distinct per `generation` (a custom section: another sha256, a new compile).
fn modules(count: u64, generation: u32) -> Result<Vec<(String, Vec<u8>)>> {
    let base = embedded_module("label-selector").context("the label-selector policy")?;
    let padding = (1usize << 20).saturating_sub(base.len());
    Ok((0..count)
        .map(|i| {
            (
                format!("p{i}.wasm"),
                with_custom_section(base, &format!("{generation}-{i}"), padding),
            )
        })
        .collect())
}

/// A cluster of five WeightedServices, each with a module of the directory.
fn cluster() -> String {
    (0..5)
        .map(|i| {
            format!(
                r#"---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web-{i}, namespace: default}}
spec:
  replicas: 3
  selector: {{matchLabels: {{app: web-{i}}}}}
  template:
    metadata: {{labels: {{app: web-{i}, env: prod}}}}
    spec: {{containers: [{{name: web, image: web, ports: [{{containerPort: 8080, name: www}}]}}]}}
---
apiVersion: codesink.net/v1alpha1
kind: WeightedService
metadata: {{name: web-{i}, namespace: default}}
spec:
  selector: {{app: web-{i}}}
  ports: [{{protocol: TCP, port: 80, targetPort: www}}]
  scheduler: wrr
  weights: [{{weight: 10, selector: {{env: prod}}}}]
  policy: {{name: p{i}}}
"#
            )
        })
        .collect()
}

/// Loads counted over `count` modules on a metrics page.
fn loads(page: &str, count: u64) -> f64 {
    (0..count)
        .filter_map(|i| {
            sample(
                page,
                &format!("ipvs_operator_policy_loads_total{{policy=\"p{i}\"}}"),
            )
        })
        .sum()
}

/// `files` as [`ConfigMapDir`] takes them.
fn refs(files: &[(String, Vec<u8>)]) -> Vec<(&str, &[u8])> {
    files
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_slice()))
        .collect()
}

struct Idle {
    cpu_percent: f64,
    read_bytes: u64,
    module_bytes: f64,
    scans: f64,
}

fn main() -> Result<()> {
    let count = env_number("POLICY_DIR_MODULES", 10)?;
    let idle = Duration::from_secs(env_number("POLICY_DIR_IDLE_SECONDS", 30)?);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let server = runtime.block_on(TestApiServer::start(Config {
        bookmark_interval: Duration::from_secs(60),
        ..Config::default()
    }))?;
    server.handle().load_manifests(&cluster())?;
    let work = tempfile::Builder::new()
        .prefix("ipvs-operator-policy-dir-")
        .tempdir()?;
    let kubeconfig = work.path().join("kubeconfig");
    std::fs::write(&kubeconfig, kubeconfig_yaml(server.url()))?;

    let first = modules(count, 1)?;
    let mut dir = ConfigMapDir::new(&refs(&first))?;
    let policy_dir = format!("--policy-dir={}", dir.path().display());
    let with_dir = Process::start(
        &["controller", &policy_dir],
        &kubeconfig,
        &work.path().join("with-dir.log"),
    )?;
    let without = Process::start(
        &["controller"],
        &kubeconfig,
        &work.path().join("without.log"),
    )?;
    let started = Instant::now();
    let load_timeout = Duration::from_secs(300);
    with_dir.wait_for(
        &format!("the controller loading {count} modules"),
        load_timeout,
        |page| loads(page, count) >= count as f64,
    )?;
    without.wait_for(
        "the baseline controller serving metrics",
        load_timeout,
        |page| !page.is_empty(),
    )?;
    eprintln!(
        "loaded {count} modules of 1 MiB in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // The update: every module changes, as a new ConfigMap version does.
    let updated = Instant::now();
    dir.update(&refs(&modules(count, 2)?))?;
    with_dir.wait_for("the controller loading the update", load_timeout, |page| {
        loads(page, count) >= 2.0 * count as f64
    })?;
    eprintln!(
        "loaded the update in {:.1} s",
        updated.elapsed().as_secs_f64()
    );
    // Let the reconciles the new modules cause finish.
    std::thread::sleep(Duration::from_secs(5));

    let ticks_per_second = clock_ticks_per_second() as f64;
    let snapshot = |process: &Process| -> Result<(u64, u64, f64, f64)> {
        let page = process.metrics();
        let pid = process.child.id();
        Ok((
            cpu_ticks(pid)?,
            read_chars(pid)?,
            sample(&page, "ipvs_operator_policy_dir_read_bytes_total").unwrap_or(0.0),
            sample(&page, "ipvs_operator_policy_dir_scans_total").unwrap_or(0.0),
        ))
    };
    let (with_before, without_before) = (snapshot(&with_dir)?, snapshot(&without)?);
    std::thread::sleep(idle);
    let (with_after, without_after) = (snapshot(&with_dir)?, snapshot(&without)?);
    let idle_of = |before: (u64, u64, f64, f64), after: (u64, u64, f64, f64)| Idle {
        cpu_percent: (after.0 - before.0) as f64 / ticks_per_second / idle.as_secs_f64() * 100.0,
        read_bytes: after.1 - before.1,
        module_bytes: after.2 - before.2,
        scans: after.3 - before.3,
    };
    let ours = idle_of(with_before, with_after);
    let baseline = idle_of(without_before, without_after);
    for (name, idle_numbers) in [
        ("with --policy-dir", &ours),
        ("without (baseline)", &baseline),
    ] {
        eprintln!(
            "controller {name}: idle CPU {:.3} % of one core, {} bytes read ({} from policy modules, {} rescans) over {} s",
            idle_numbers.cpu_percent,
            idle_numbers.read_bytes,
            idle_numbers.module_bytes,
            idle_numbers.scans,
            idle.as_secs()
        );
    }
    let round = |x: f64| (x * 1000.0).round() / 1000.0;
    let report = serde_json::json!({
        "name": "policy-dir",
        "what": format!("an idle controller's CPU (% of one core) over {} s after a ConfigMap-style update of {count} policy modules of 1 MiB in its --policy-dir (baseline: the same controller without --policy-dir, same run)", idle.as_secs()),
        "ours": round(ours.cpu_percent),
        "baseline": round(baseline.cpu_percent),
        "unit": "% CPU",
        "n": count,
        "idleSeconds": idle.as_secs(),
        "policyDirReadBytes": ours.module_bytes,
        "policyDirRescans": ours.scans,
        "readBytes": ours.read_bytes,
        "baselineReadBytes": baseline.read_bytes,
        "goal": "0 bytes read from policy modules, CPU under 0.1 %",
    });
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(
        out.join("policy-dir.json"),
        serde_json::to_string_pretty(&report)? + "\n",
    )?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    drop((with_dir, without));
    runtime.block_on(server.shutdown());
    Ok(())
}
