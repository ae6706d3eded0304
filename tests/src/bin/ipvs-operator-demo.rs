//! `make demo`: the real thing, end to end, on a manifest of Deployments and
//! WeightedServices (default: the original ipvs-operator's `test/example.yaml`).
//!
//! Runs inside the test VM (a kernel with IPVS): the test API server, the
//! kube-proxy emulator, the real `ipvs-operator controller` and `agent`, one
//! network namespace per pod answering connections, and a client that opens
//! connections to each WeightedService's ClusterIP and counts who answered. It
//! prints, per weight group, the share of connections the weights ask for and
//! the share measured; the kernel's table (`ipvsadm -Ln`); and the
//! WeightedServices as `kubectl get weightedservices -A` shows them. The same
//! figures go to `--out`/result.json. It fails (exit 1) when a measured share is
//! more than `--tolerance` away from the desired one.
//!
//! It runs the controller and agent as production does: without a compiled-
//! policy cache (each compiles its policies when it starts), and with whichever
//! `ipvs-operator` sits next to this executable — in the VM, `make demo
//! DEMO_BINARY=shipped` (and `make test`) puts the shipped static musl binary
//! there. What it ran (path, libc, linkage, stripped, sha256) and how long the
//! start took go to the output and result.json.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use ipvs_operator_tests::testbed::{metric, Testbed, TestbedConfig, NODE_NAME};
use serde_json::{json, Value};

/// The CRD as `ipvs-operator crd` prints it: its printer columns drive the table.
const CRD_YAML: &str = include_str!("../../../deploy/crd.yaml");

/// Kinds the demo loads; anything else (an Ingress, say) is skipped with a notice.
const LOADED_KINDS: &[&str] = &["Namespace", "Deployment", "Pod", "WeightedService"];

#[derive(Parser, Debug)]
#[command(about = "Run ipvs-operator end to end on a manifest and measure the split (inside the test VM: see `make demo`)")]
struct Args {
    /// Deployments (or Pods) and WeightedServices: multi-document YAML files,
    /// `kind: List` included.
    #[arg(required = true)]
    manifests: Vec<PathBuf>,
    /// Connections to open to each WeightedService.
    #[arg(long, env = "DEMO_CONNECTIONS", default_value_t = 5000)]
    connections: usize,
    /// Largest acceptable difference between a desired and a measured share, in
    /// percentage points.
    #[arg(long, default_value_t = 2.0)]
    tolerance: f64,
    /// Where result.json goes.
    #[arg(long, default_value = "target/demo")]
    out: PathBuf,
    /// The host file the VM runner put in place of target/release/ipvs-operator
    /// (`make demo DEMO_BINARY=shipped`): only reported, next to what the demo
    /// finds in the binary it runs.
    #[arg(long, value_name = "PATH")]
    operator_source: Option<PathBuf>,
}

/// One WeightedService's part of the result.
struct Measured {
    namespace: String,
    name: String,
    groups: Vec<GroupResult>,
    total: usize,
    /// From the start of the controller and agent to its weights in the kernel.
    converged_after: Duration,
}

struct GroupResult {
    label: String,
    selector: Value,
    weight: Option<u64>,
    pods: usize,
    desired: f64,
    connections: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut text = String::new();
    for path in &args.manifests {
        text += &std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        text += "\n---\n";
    }
    let (manifest, weighted_services) = select_documents(&text)?;
    if weighted_services.is_empty() {
        bail!("no WeightedService in {:?}: nothing to demonstrate", args.manifests);
    }
    // kube-proxy runs with the scheduler the WeightedServices ask for, as the
    // README advises; otherwise its syncs and the agent swap schedulers back
    // and forth.
    let scheduler = weighted_services[0]["spec"]["scheduler"].as_str().unwrap_or("wrr").to_string();
    let operator = describe_binary(&traffic::netns::project_binary("ipvs-operator"), args.operator_source.as_deref())?;
    step(&format!(
        "ipvs-operator: {} ({}{}, {}, {:.1} MB, sha256 {}){}",
        operator["path"].as_str().unwrap_or_default(),
        operator["linkage"].as_str().unwrap_or_default(),
        operator["libc"].as_str().map(|l| format!(" {l}")).unwrap_or_default(),
        if operator["stripped"] == true { "stripped" } else { "not stripped" },
        operator["bytes"].as_u64().unwrap_or(0) as f64 / 1e6,
        operator["sha256"].as_str().map(|h| &h[..h.len().min(16)]).unwrap_or("?"),
        args.operator_source.as_ref().map(|s| format!(", from the host's {}", s.display())).unwrap_or_default(),
    ));
    step(&format!(
        "starting the test API server, kube-proxy (emulator, --ipvs-scheduler={scheduler}), ipvs-operator controller and agent on {NODE_NAME}"
    ));
    let mut bed = Testbed::new(TestbedConfig {
        drift_interval: Duration::from_secs(2),
        proxy_scheduler: scheduler,
        // No compiled-policy cache, as deployed (deploy/ sets none): the testbed
        // gives every process one shared directory (IPVS_OPERATOR_POLICY_CACHE),
        // which this flag overrides with a path nothing can be read from or
        // written to, so the controller and the agent each compile what they use.
        policy_flags: vec!["--policy-cache".into(), "/dev/null".into()],
        ..TestbedConfig::default()
    });
    bed.handle().load_manifests(&manifest).context("loading the manifest into the test API server")?;
    bed.sync_backends();
    let pods = bed.handle().list("pods", None);
    step(&format!("{} pods running, each in a network namespace that answers with its name", pods.len()));
    let started = Instant::now();
    bed.start_all();

    let mut results = Vec::new();
    for ws in &weighted_services {
        let namespace = ws["metadata"]["namespace"].as_str().unwrap_or("default").to_string();
        let name = ws["metadata"]["name"].as_str().unwrap_or_default().to_string();
        match measure(&bed, &namespace, &name, args.connections, started) {
            Ok(m) => results.push(m),
            Err(e) => {
                eprintln!("{}", bed.logs());
                return Err(e.context(format!("WeightedService {namespace}/{name}")));
            }
        }
    }

    println!("\n$ ipvsadm -Ln   (in the node)\n{}", bed.ipvsadm().trim_end());
    let listed = bed.handle().list("weightedservices", None);
    println!("\n$ kubectl get weightedservices -A\n{}", get_table(&listed)?);
    println!("\n$ curl -s http://<agent>:9494/metrics | grep -E 'evaluations_total|writes_total'   (excerpt)");
    if let Some(text) = bed.agent_metrics() {
        for line in text.lines().filter(|l| {
            !l.starts_with('#') && (l.starts_with("ipvs_operator_policy_evaluations_total") || l.starts_with("ipvs_operator_netlink_writes_total"))
        }) {
            println!("{line}");
        }
        let repairs = metric(&text, "ipvs_operator_drift_repairs_total", "").unwrap_or(0.0);
        println!("(drift repairs so far: {repairs})");
    }

    let startup = startup(&bed, &results);
    println!(
        "\nstart-up without a compiled-policy cache: first weights in the kernel {:.1} s after the controller and agent started; policies compiled: {}",
        startup["firstConvergedSeconds"].as_f64().unwrap_or(0.0),
        startup["compiles"]
            .as_array()
            .map(|c| c.iter().map(|c| format!("{} {} in {} ms", c["process"].as_str().unwrap_or("?"), c["policy"].as_str().unwrap_or("?"), c["tookMs"])).collect::<Vec<_>>().join(", "))
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "none found in the logs".into()),
    );
    let mut report = report(&results);
    report["operator"] = operator;
    report["startup"] = startup;
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let path = args.out.join("result.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n").with_context(|| format!("writing {}", path.display()))?;

    println!();
    let mut off = Vec::new();
    for m in &results {
        for g in &m.groups {
            let measured = g.connections as f64 / m.total.max(1) as f64;
            if (measured - g.desired).abs() * 100.0 > args.tolerance {
                off.push(format!("{}/{} {}: desired {:.2}%, measured {:.2}%", m.namespace, m.name, g.label, g.desired * 100.0, measured * 100.0));
            }
        }
    }
    if !off.is_empty() {
        bail!("measured shares more than {} percentage points off:\n  {}", args.tolerance, off.join("\n  "));
    }
    println!("OK: every measured share is within {} percentage points of the desired one ({}).", args.tolerance, path.display());
    Ok(())
}

fn step(what: &str) {
    println!("==> {what}");
}

/// The documents the demo loads, as YAML again, and the WeightedServices among
/// them; other kinds are reported and skipped.
fn select_documents(text: &str) -> Result<(String, Vec<Value>)> {
    let mut kept = Vec::new();
    let mut weighted_services = Vec::new();
    let mut documents = Vec::new();
    for document in serde_yaml::Deserializer::from_str(text) {
        let value = Value::deserialize(document).context("the manifest is not valid YAML")?;
        match value["kind"].as_str() {
            Some("List") => documents.extend(value["items"].as_array().cloned().unwrap_or_default()),
            _ if value.is_null() => {}
            _ => documents.push(value),
        }
    }
    for value in documents {
        let kind = value["kind"].as_str().unwrap_or("(no kind)");
        let name = value["metadata"]["name"].as_str().unwrap_or("(no name)");
        if !LOADED_KINDS.contains(&kind) {
            let why = if kind == "Ingress" {
                ": the demo has no ingress controller (and most send traffic to pod IPs directly, which bypasses IPVS weights)"
            } else {
                ""
            };
            println!("notice: ignoring {kind} {name}{why}");
            continue;
        }
        if kind == "WeightedService" {
            weighted_services.push(value.clone());
        }
        kept.push(serde_yaml::to_string(&value)?);
    }
    Ok((kept.join("---\n"), weighted_services))
}

use serde::Deserialize as _;

/// Wait until the kernel has the weights the WeightedService's status promises,
/// then open connections to its first TCP port and count them per group.
fn measure(bed: &Testbed, namespace: &str, name: &str, connections: usize, processes_started: Instant) -> Result<Measured> {
    let service = format!("{namespace}/{name}");
    step(&format!("waiting for WeightedService {service}: its Service, its status, and its weights in the kernel"));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(180);
    let (ws, vip) = loop {
        if let Some(found) = converged(bed, namespace, name) {
            break found;
        }
        if Instant::now() > deadline {
            let ws = bed.get("weightedservices", namespace, name).unwrap_or(Value::Null);
            bail!("no convergence after {:?}; its status: {}", deadline - started, ws["status"]);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let converged_after = processes_started.elapsed();
    let scheduler = bed.ipvs().into_iter().find(|e| e.service.address() == Some(vip)).map(|e| e.service.scheduler).unwrap_or_default();
    let policy = ws["status"]["policy"]["name"].as_str().unwrap_or("label-selector");
    step(&format!(
        "weights in place after {:.1}s (Service {}, {vip}, scheduler {scheduler}, policy {policy}); opening {connections} connections from the client",
        started.elapsed().as_secs_f64(),
        ws["status"]["serviceName"].as_str().unwrap_or(name),
    ));
    let (counts, errors) = bed.connect_counting_errors(vip, connections);
    if !errors.is_empty() {
        bail!("{} of {connections} connections failed, e.g. {:?}", errors.len(), errors.first());
    }
    let groups_spec = ws["spec"]["weights"].as_array().cloned().unwrap_or_default();
    let labels_by_pod: BTreeMap<String, Value> = bed
        .handle()
        .list("pods", Some(namespace))
        .into_iter()
        .filter_map(|p| Some((p["metadata"]["name"].as_str()?.to_string(), p["metadata"]["labels"].clone())))
        .collect();
    let status_groups = ws["status"]["groups"].as_array().cloned().unwrap_or_default();
    let mut groups: Vec<GroupResult> = status_groups
        .iter()
        .map(|g| GroupResult {
            label: selector_label(&g["selector"]),
            selector: g["selector"].clone(),
            weight: g["weight"].as_u64(),
            pods: g["endpoints"].as_u64().unwrap_or(0) as usize,
            desired: g["share"].as_f64().unwrap_or(0.0),
            connections: 0,
        })
        .collect();
    for (pod, n) in &counts {
        let labels = labels_by_pod.get(pod).cloned().unwrap_or(Value::Null);
        let row = match group_of(&groups_spec, &labels) {
            Some(i) => i,
            // Endpoints of no group: the status' last row, without a weight.
            None => groups.iter().rposition(|g| g.weight.is_none()).unwrap_or(groups.len().saturating_sub(1)),
        };
        if let Some(g) = groups.get_mut(row) {
            g.connections += n;
        }
    }
    let total = counts.values().sum();
    print_groups(&groups, total);
    Ok(Measured { namespace: namespace.into(), name: name.into(), groups, total, converged_after })
}

/// The WeightedService and its VIP, once its status is current and Ready and
/// the kernel's weights give the shares its status states.
fn converged(bed: &Testbed, namespace: &str, name: &str) -> Option<(Value, SocketAddr)> {
    let ws = bed.get("weightedservices", namespace, name)?;
    let status = &ws["status"];
    if status["observedGeneration"] != ws["metadata"]["generation"] {
        return None;
    }
    let ready = status["conditions"].as_array()?.iter().any(|c| c["type"] == "Ready" && c["status"] == "True");
    if !ready {
        return None;
    }
    let service = bed.get("services", namespace, status["serviceName"].as_str().unwrap_or(name))?;
    let ip: IpAddr = service["spec"]["clusterIP"].as_str()?.parse().ok()?;
    let port = service["spec"]["ports"].as_array()?.iter().find(|p| p["protocol"].as_str().unwrap_or("TCP") == "TCP")?;
    let vip = SocketAddr::new(ip, u16::try_from(port["port"].as_u64()?).ok()?);
    let entry = bed.ipvs().into_iter().find(|e| e.service.address() == Some(vip))?;
    let groups_spec = ws["spec"]["weights"].as_array().cloned().unwrap_or_default();
    let labels_by_ip: BTreeMap<IpAddr, Value> = bed
        .handle()
        .list("pods", Some(namespace))
        .into_iter()
        .filter_map(|p| Some((p["status"]["podIP"].as_str()?.parse().ok()?, p["metadata"]["labels"].clone())))
        .collect();
    // The kernel's share per group, in the status' rows.
    let rows = status["groups"].as_array()?;
    let mut kernel = vec![0u64; rows.len()];
    let mut total = 0u64;
    for d in &entry.destinations {
        let labels = labels_by_ip.get(&d.socket_addr().ip())?;
        let row = group_of(&groups_spec, labels).or_else(|| rows.iter().rposition(|r| r["weight"].is_null()))?;
        *kernel.get_mut(row)? += u64::from(d.weight);
        total += u64::from(d.weight);
    }
    if total == 0 {
        return None;
    }
    let agree = rows
        .iter()
        .zip(&kernel)
        .all(|(row, w)| (row["share"].as_f64().unwrap_or(0.0) - *w as f64 / total as f64).abs() < 0.005);
    agree.then_some((ws, vip))
}

/// The last group of `spec.weights` whose selector matches `labels` (the
/// original's rule).
fn group_of(groups: &[Value], labels: &Value) -> Option<usize> {
    groups.iter().rposition(|g| {
        g["selector"].as_object().is_some_and(|selector| selector.iter().all(|(k, v)| labels.get(k) == Some(v)))
    })
}

fn selector_label(selector: &Value) -> String {
    match selector.as_object() {
        Some(s) if !s.is_empty() => s.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default())).collect::<Vec<_>>().join(","),
        _ => "(no group)".into(),
    }
}

fn print_groups(groups: &[GroupResult], total: usize) {
    let width = groups.iter().map(|g| g.label.len()).max().unwrap_or(5).max(5);
    println!("    {:width$}  {:>4}  {:>6}  {:>8}  {:>8}  {:>11}", "GROUP", "PODS", "WEIGHT", "DESIRED", "MEASURED", "CONNECTIONS");
    for g in groups {
        let weight = g.weight.map(|w| w.to_string()).unwrap_or_else(|| "-".into());
        let measured = g.connections as f64 / total.max(1) as f64;
        println!(
            "    {:width$}  {:>4}  {:>6}  {:>7.2}%  {:>7.2}%  {:>11}",
            g.label,
            g.pods,
            weight,
            g.desired * 100.0,
            measured * 100.0,
            g.connections
        );
    }
}

fn report(results: &[Measured]) -> Value {
    let groups: Vec<Value> = results
        .iter()
        .flat_map(|m| {
            m.groups.iter().map(move |g| {
                json!({
                    "weightedService": format!("{}/{}", m.namespace, m.name),
                    "selector": g.selector,
                    "desiredShare": g.desired,
                    "measuredShare": g.connections as f64 / m.total.max(1) as f64,
                    "connections": g.connections,
                })
            })
        })
        .collect();
    json!({ "groups": groups })
}

/// What the start took without a compiled-policy cache: from starting the
/// controller and agent to each WeightedService's weights in the kernel, and
/// the policy compiles their logs report (`policy compiled … took_ms=N`).
fn startup(bed: &Testbed, results: &[Measured]) -> Value {
    let mut compiles = Vec::new();
    let mut cache_loads = 0;
    for process in ["controller", "agent"] {
        for line in bed.log(process).lines() {
            if line.contains("policy loaded from the compile cache") {
                cache_loads += 1;
            }
            if !line.contains("policy compiled") {
                continue;
            }
            let field = |name: &str| {
                line.split_whitespace().find_map(|w| w.strip_prefix(name)?.strip_prefix('=')).map(|v| v.trim_matches('"').to_string())
            };
            compiles.push(json!({
                "process": process,
                "policy": field("policy"),
                "tookMs": field("took_ms").and_then(|t| t.parse::<u64>().ok()),
            }));
        }
    }
    json!({
        "policyCache": "none",
        "firstConvergedSeconds": results.iter().map(|m| m.converged_after.as_secs_f64()).reduce(f64::min),
        "convergedSeconds": results
            .iter()
            .map(|m| (format!("{}/{}", m.namespace, m.name), json!((m.converged_after.as_secs_f64() * 10.0).round() / 10.0)))
            .collect::<serde_json::Map<_, _>>(),
        "compiles": compiles,
        "cacheLoads": cache_loads,
    })
}

/// The `ipvs-operator` the demo runs, as its ELF headers tell: the path, the
/// libc (musl or glibc: a dynamic loader names it; a static binary without
/// glibc's tunables is musl), static or dynamic, stripped or not, its size
/// and sha256; and `source`, the host file it was copied from, when given.
fn describe_binary(path: &Path, source: Option<&Path>) -> Result<Value> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (interpreter, stripped) = elf_facts(&bytes).with_context(|| format!("{} is not a 64-bit little-endian ELF file", path.display()))?;
    let has = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    let libc = match &interpreter {
        Some(loader) if loader.contains("musl") => "musl",
        Some(_) => "glibc",
        None if has(b"GLIBC_TUNABLES") => "glibc",
        None => "musl",
    };
    let sha256 = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().next().map(str::to_string));
    Ok(json!({
        "path": path,
        "source": source,
        "libc": libc,
        "linkage": if interpreter.is_some() { "dynamic" } else { "static" },
        "interpreter": interpreter,
        "stripped": stripped,
        "bytes": bytes.len(),
        "sha256": sha256,
    }))
}

/// An ELF64 little-endian file's program interpreter (PT_INTERP), if any, and
/// whether it is stripped (has no `.symtab` section).
fn elf_facts(elf: &[u8]) -> Option<(Option<String>, bool)> {
    if elf.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let u16_at = |o: usize| Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?) as usize);
    let u32_at = |o: usize| Some(u32::from_le_bytes(elf.get(o..o + 4)?.try_into().ok()?) as usize);
    let u64_at = |o: usize| Some(u64::from_le_bytes(elf.get(o..o + 8)?.try_into().ok()?) as usize);
    const PT_INTERP: usize = 3;
    let (phoff, phentsize, phnum) = (u64_at(0x20)?, u16_at(0x36)?, u16_at(0x38)?);
    let mut interpreter = None;
    for ph in (0..phnum).map(|i| phoff + i * phentsize) {
        if u32_at(ph)? == PT_INTERP {
            let (offset, size) = (u64_at(ph + 0x08)?, u64_at(ph + 0x20)?);
            interpreter = Some(String::from_utf8_lossy(elf.get(offset..offset + size)?).trim_end_matches('\0').to_string());
        }
    }
    let (shoff, shentsize, shnum, shstrndx) = (u64_at(0x28)?, u16_at(0x3a)?, u16_at(0x3c)?, u16_at(0x3e)?);
    let names = u64_at(shoff + shstrndx * shentsize + 0x18)?;
    let mut symtab = false;
    for sh in (0..shnum).map(|i| shoff + i * shentsize) {
        let name = elf.get(names + u32_at(sh)?..)?;
        symtab |= name.split(|&b| b == 0).next() == Some(b".symtab".as_slice());
    }
    Some((interpreter, !symtab))
}

/// `kubectl get weightedservices -A`, from the CRD's printer columns.
fn get_table(items: &[Value]) -> Result<String> {
    let crd: Value = serde_yaml::from_str(CRD_YAML).context("deploy/crd.yaml")?;
    let version = crd["spec"]["versions"].as_array().and_then(|v| v.iter().find(|v| v["served"] == true)).cloned().unwrap_or(Value::Null);
    let columns = version["additionalPrinterColumns"].as_array().cloned().unwrap_or_default();
    let mut rows = vec![
        ["NAMESPACE".to_string(), "NAME".to_string()]
            .into_iter()
            .chain(columns.iter().map(|c| c["name"].as_str().unwrap_or_default().to_uppercase()))
            .collect::<Vec<_>>(),
    ];
    let now = jiff::Timestamp::now();
    for item in items {
        let mut row = vec![
            item["metadata"]["namespace"].as_str().unwrap_or_default().to_string(),
            item["metadata"]["name"].as_str().unwrap_or_default().to_string(),
        ];
        for c in &columns {
            let value = json_path(item, c["jsonPath"].as_str().unwrap_or_default());
            let cell = match (c["type"].as_str(), value.as_ref().and_then(Value::as_str)) {
                (Some("date"), Some(t)) => t.parse::<jiff::Timestamp>().map(|t| age(now.duration_since(t).as_secs())).unwrap_or_else(|_| t.to_string()),
                (_, Some(s)) => s.to_string(),
                (_, None) => value.map(|v| v.to_string()).unwrap_or_else(|| "<none>".into()),
            };
            row.push(cell);
        }
        rows.push(row);
    }
    let widths: Vec<usize> = (0..rows[0].len()).map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0)).collect();
    Ok(rows
        .iter()
        .map(|r| r.iter().zip(&widths).map(|(cell, w)| format!("{cell:w$}")).collect::<Vec<_>>().join("   ").trim_end().to_string())
        .collect::<Vec<_>>()
        .join("\n"))
}

/// The subset of kubectl's JSONPath that printer columns use: `.a.b` and
/// `[?(@.key=="value")]` filters on lists.
fn json_path(item: &Value, path: &str) -> Option<Value> {
    let mut current = item.clone();
    let mut rest = path;
    while !rest.is_empty() {
        if let Some(filter) = rest.strip_prefix("[?(@.") {
            let (expr, after) = filter.split_once(")]")?;
            let (key, wanted) = expr.split_once("==")?;
            let wanted = wanted.trim_matches('"');
            current = current.as_array()?.iter().find(|e| e[key].as_str() == Some(wanted))?.clone();
            rest = after;
        } else if let Some(field) = rest.strip_prefix('.') {
            let end = field.find(['.', '[']).unwrap_or(field.len());
            current = current.get(&field[..end])?.clone();
            rest = &field[end..];
        } else {
            return None;
        }
    }
    Some(current)
}

/// kubectl's age format (its `HumanDuration`): 45s, 3m12s, 125m, 4h5m, 30h, 3d4h, 12d.
fn age(seconds: i64) -> String {
    let s = seconds.max(0);
    let (m, h, d) = (s / 60, s / 3600, s / 86400);
    let unless_zero = |n: i64, unit: &str| if n == 0 { String::new() } else { format!("{n}{unit}") };
    if s < 120 {
        format!("{s}s")
    } else if m < 10 {
        format!("{m}m{}", unless_zero(s % 60, "s"))
    } else if m < 180 {
        format!("{m}m")
    } else if h < 8 {
        format!("{h}h{}", unless_zero(m % 60, "m"))
    } else if h < 48 {
        format!("{h}h")
    } else if h < 192 {
        format!("{d}d{}", unless_zero(h % 24, "h"))
    } else {
        format!("{d}d")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printer_column_paths_are_followed() {
        let ws = json!({"status": {"serviceName": "example", "conditions": [
            {"type": "PolicyReady", "status": "True"}, {"type": "Ready", "status": "False"}]}});
        assert_eq!(json_path(&ws, ".status.serviceName"), Some(json!("example")));
        assert_eq!(json_path(&ws, ".status.conditions[?(@.type==\"Ready\")].status"), Some(json!("False")));
        assert_eq!(json_path(&ws, ".status.policy.name"), None);
    }

    #[test]
    fn ages_read_like_kubectl() {
        assert_eq!(age(45), "45s");
        assert_eq!(age(192), "3m12s");
        assert_eq!(age(7500), "125m");
        assert_eq!(age(4 * 3600 + 300), "4h5m");
        assert_eq!(age(4 * 86400 + 5), "4d");
        assert_eq!(age(20 * 86400), "20d");
    }

    #[test]
    fn the_ingress_of_the_original_example_is_skipped() {
        let text = include_str!("../../../examples/original-example.yaml");
        let (kept, weighted_services) = select_documents(text).expect("the example parses");
        assert_eq!(weighted_services.len(), 1);
        assert!(!kept.contains("Ingress"), "{kept}");
        assert_eq!(kept.matches("kind: Deployment").count(), 2);
    }

    #[test]
    fn this_executable_is_described() {
        let exe = std::env::current_exe().unwrap();
        let described = describe_binary(&exe, None).expect("an ELF file");
        assert_eq!(described["libc"], if cfg!(target_env = "musl") { "musl" } else { "glibc" }, "{described}");
        assert_eq!(described["linkage"] == "dynamic", described["interpreter"].is_string(), "{described}");
        assert!(elf_facts(b"#!/bin/sh\n").is_none());
    }

    #[test]
    fn a_pod_takes_the_last_matching_group() {
        let groups = vec![json!({"weight": 10, "selector": {"app": "demo"}}), json!({"weight": 1, "selector": {"env": "canary"}})];
        assert_eq!(group_of(&groups, &json!({"app": "demo", "env": "canary"})), Some(1));
        assert_eq!(group_of(&groups, &json!({"app": "demo", "env": "prod"})), Some(0));
        assert_eq!(group_of(&groups, &json!({"app": "other"})), None);
    }
}
