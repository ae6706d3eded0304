//! `make demo`: the real thing, end to end, on a manifest of Deployments and
//! WeightedServices (default: the original ipvs-operator's `test/example.yaml`).
//!
//! Runs inside the test VM (a kernel with IPVS): the test API server, the
//! kube-proxy emulator (`--kube-proxy ipvs`, the default; `none` runs none, for
//! WeightedServices with `proxy: ipvs-operator`), the real `ipvs-operator controller` and `agent`, one
//! network namespace per pod answering connections, and a client that opens
//! connections to every address of each WeightedService's Service — each
//! ClusterIP (the demo makes the Service dual-stack: an IPv4 and an IPv6 one)
//! and the NodePort on the node's IPv4 and IPv6 address (it makes the Service a
//! NodePort one unless the manifest gives a type) — and counts who answered. It
//! prints, per address and weight group, the share of connections the weights
//! ask for and the share measured; how many of the agent's periodic sweeps
//! found something to fix in 10 quiet seconds afterwards (none, when the
//! kernel stays as the agent left it); the kernel's table (`ipvsadm -Ln`); and
//! the WeightedServices as `kubectl get weightedservices -A` shows them. The
//! same figures go to `--out`/result.json. It fails (exit 1) when a measured
//! share is more than `--tolerance` away from the desired one.
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
use ipvs_operator_tests::testbed::{
    metric, pod_ips, service_cluster_ips, Testbed, TestbedConfig, NODE_IP, NODE_IP6, NODE_NAME,
};
use serde_json::{json, Value};

/// The CRDs as `ipvs-operator crd` prints them: the WeightedService one's
/// printer columns drive the table.
const CRD_YAML: &str = include_str!("../../../deploy/crd.yaml");

/// Kinds the demo loads; anything else (an Ingress, say) is skipped with a notice.
const LOADED_KINDS: &[&str] = &["Namespace", "Deployment", "Pod", "WeightedService"];

/// The agent's count of periodic sweeps that found a virtual service to fix.
const SWEEP_DIFFERENCES: &str = "ipvs_operator_sweep_differences_total";

/// How long the demo leaves everything alone after measuring, counting what
/// the agent's sweeps find to fix meanwhile.
const QUIET: Duration = Duration::from_secs(10);

#[derive(Parser, Debug)]
#[command(about = "Run ipvs-operator end to end on a manifest and measure the split (inside the test VM: see `make demo`)")]
struct Args {
    /// Deployments (or Pods) and WeightedServices: multi-document YAML files,
    /// `kind: List` included.
    #[arg(required = true)]
    manifests: Vec<PathBuf>,
    /// Connections to open to each address (ClusterIP, NodePort) of each WeightedService.
    #[arg(long, env = "DEMO_CONNECTIONS", default_value_t = 5000)]
    connections: usize,
    /// Largest acceptable difference between a desired and a measured share, in
    /// percentage points.
    #[arg(long, default_value_t = 2.0)]
    tolerance: f64,
    /// Where result.json goes.
    #[arg(long, default_value = "target/demo")]
    out: PathBuf,
    /// Which kube-proxy runs on the node: `ipvs` (the emulator of its IPVS
    /// mode; it leaves alone the addresses of Services the agent serves
    /// itself, `--ipvs-exclude-cidrs`, as the README tells users to) or
    /// `none` (WeightedServices must then say `proxy: ipvs-operator`).
    #[arg(long, env = "DEMO_KUBE_PROXY", value_enum, default_value_t = KubeProxy::Ipvs)]
    kube_proxy: KubeProxy,
    /// The host file the VM runner put in place of target/release/ipvs-operator
    /// (`make demo DEMO_BINARY=shipped`): only reported, next to what the demo
    /// finds in the binary it runs.
    #[arg(long, value_name = "PATH")]
    operator_source: Option<PathBuf>,
}

/// `--kube-proxy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum KubeProxy {
    /// The kube-proxy emulator, IPVS mode.
    Ipvs,
    /// No kube-proxy at all.
    None,
}

/// One WeightedService's part of the result.
struct Measured {
    namespace: String,
    name: String,
    /// One per address of its Service the connections went to.
    targets: Vec<Target>,
    /// From the start of the controller and agent to its weights in the kernel.
    converged_after: Duration,
}

/// An address of a WeightedService's Service, and the connections to it.
struct Target {
    /// `clusterIP` or `nodePort`: how the connections reached the Service.
    path: &'static str,
    /// The virtual service (address and port) they went to.
    address: SocketAddr,
    groups: Vec<GroupResult>,
    total: usize,
}

#[derive(Clone)]
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
    let standalone: Vec<&Value> = weighted_services.iter().filter(|ws| ws["spec"]["proxy"] == "ipvs-operator").collect();
    if args.kube_proxy == KubeProxy::None && standalone.len() < weighted_services.len() {
        bail!("--kube-proxy none: every WeightedService needs `proxy: ipvs-operator` (nothing else makes virtual services)");
    }
    let proxy = match args.kube_proxy {
        KubeProxy::Ipvs => format!("kube-proxy (emulator, IPVS mode, --ipvs-scheduler={scheduler})"),
        KubeProxy::None => "no kube-proxy".into(),
    };
    step(&format!("starting the test API server, {proxy}, ipvs-operator controller and agent on {NODE_NAME}"));
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
    if args.kube_proxy == KubeProxy::Ipvs && !standalone.is_empty() {
        // As the README says for IPVS clusters: kube-proxy leaves the agent's
        // virtual services alone where --ipvs-exclude-cidrs covers them, and
        // the agent's NodePorts are on kube-proxy's --nodeport-addresses.
        let node_addresses = format!("{NODE_IP}/32,{NODE_IP6}/128");
        bed.config_mut().agent_flags.extend(["--nodeport-addresses".into(), node_addresses.clone()]);
        bed.start_controller();
        bed.start_agent();
        let mut excluded = vec![node_addresses];
        for ws in &standalone {
            let namespace = ws["metadata"]["namespace"].as_str().unwrap_or("default");
            let name = ws["metadata"]["name"].as_str().unwrap_or_default();
            let deadline = Instant::now() + Duration::from_secs(60);
            let ips = loop {
                let ips = bed.get("services", namespace, name).map(|s| service_cluster_ips(&s)).unwrap_or_default();
                if !ips.is_empty() {
                    break ips;
                }
                if Instant::now() > deadline {
                    eprintln!("{}", bed.logs());
                    bail!("WeightedService {namespace}/{name}: no Service with a ClusterIP after 60 s");
                }
                std::thread::sleep(Duration::from_millis(200));
            };
            excluded.extend(ips.iter().map(|ip| if ip.is_ipv4() { format!("{ip}/32") } else { format!("{ip}/128") }));
        }
        let excluded = excluded.join(",");
        step(&format!("kube-proxy leaves the agent's own virtual services alone: --ipvs-exclude-cidrs={excluded}"));
        bed.config_mut().proxy_flags.extend(["--ipvs-exclude-cidrs".into(), excluded]);
        bed.start_emulator();
    } else {
        if args.kube_proxy == KubeProxy::Ipvs {
            bed.start_emulator();
        }
        bed.start_controller();
        bed.start_agent();
    }

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

    let quiet_sweep_differences = match quiet_sweep_differences(&bed) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("{}", bed.logs());
            return Err(e);
        }
    };

    println!("\n$ ipvsadm -Ln   (in the node)\n{}", bed.ipvsadm().trim_end());
    let listed = bed.handle().list("weightedservices", None);
    println!("\n$ kubectl get weightedservices -A\n{}", get_table(&listed)?);
    let grep = "grep -E 'evaluations_total|writes_total|sweep_differences_total'";
    println!("\n$ curl -s http://<agent>:9494/metrics | {grep}   (excerpt)");
    if let Some(text) = bed.agent_metrics() {
        let shown = ["ipvs_operator_policy_evaluations_total", "ipvs_operator_netlink_writes_total", SWEEP_DIFFERENCES];
        for line in text.lines().filter(|l| !l.starts_with('#') && shown.iter().any(|m| l.starts_with(m))) {
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
    report["quietSweepDifferences"] = json!(quiet_sweep_differences);
    report["kubeProxy"] = json!(match args.kube_proxy {
        KubeProxy::Ipvs => "ipvs",
        KubeProxy::None => "none",
    });
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let path = args.out.join("result.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n").with_context(|| format!("writing {}", path.display()))?;

    println!();
    let mut off = Vec::new();
    for m in &results {
        for t in &m.targets {
            for g in &t.groups {
                let measured = g.connections as f64 / t.total.max(1) as f64;
                if (measured - g.desired).abs() * 100.0 > args.tolerance {
                    off.push(format!(
                        "{}/{} {} {} {}: desired {:.2}%, measured {:.2}%",
                        m.namespace,
                        m.name,
                        t.path,
                        t.address,
                        g.label,
                        g.desired * 100.0,
                        measured * 100.0
                    ));
                }
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
    for value in serde_saphyr::from_multiple::<Value>(text).context("the manifest is not valid YAML")? {
        match value["kind"].as_str() {
            Some("List") => documents.extend(value["items"].as_array().cloned().unwrap_or_default()),
            _ if value.is_null() => {}
            _ => documents.push(value),
        }
    }
    for mut value in documents {
        let kind = value["kind"].as_str().unwrap_or("(no kind)").to_string();
        let kind = kind.as_str();
        let name = value["metadata"]["name"].as_str().unwrap_or("(no name)").to_string();
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
            // Every path to the Service is measured: both IP families' ClusterIPs
            // and the NodePorts, unless the manifest says otherwise.
            let mut added = Vec::new();
            for (field, default) in [("ipFamilyPolicy", "PreferDualStack"), ("type", "NodePort")] {
                if value["spec"].get(field).is_none() {
                    value["spec"][field] = json!(default);
                    added.push(format!("{field}: {default}"));
                }
            }
            if !added.is_empty() {
                let added = added.join(", ");
                println!("notice: WeightedService {name}: the demo sets {added} (connections go to every address)");
            }
            weighted_services.push(value.clone());
        }
        kept.push(serde_saphyr::to_string(&value)?);
    }
    Ok((kept.join("---\n"), weighted_services))
}


/// Wait until the kernel has the weights the WeightedService's status promises
/// on every address of its Service, then open connections to each (its first
/// TCP port) and count them per group.
fn measure(bed: &Testbed, namespace: &str, name: &str, connections: usize, processes_started: Instant) -> Result<Measured> {
    let service = format!("{namespace}/{name}");
    step(&format!("waiting for WeightedService {service}: its Service, its status, and its weights in the kernel"));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(180);
    let (ws, addresses, unserved) = loop {
        let why = match converged(bed, namespace, name) {
            Ok(found) => break found,
            Err(why) => why,
        };
        if Instant::now() > deadline {
            let ws = bed.get("weightedservices", namespace, name).unwrap_or(Value::Null);
            bail!("no convergence after {:?} ({why}); its status: {}", deadline - started, ws["status"]);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let converged_after = processes_started.elapsed();
    for (path, address) in unserved {
        let family = if address.is_ipv4() { "IPv4" } else { "IPv6" };
        println!("notice: not measuring {address} ({path}): no pod of {service} has an {family} address");
    }
    let first = addresses.first().map(|(_, a)| *a);
    let scheduler =
        bed.ipvs().into_iter().find(|e| e.service.address() == first).map(|e| e.service.scheduler).unwrap_or_default();
    let policy = ws["status"]["policy"]["name"].as_str().unwrap_or("label-selector");
    step(&format!(
        "weights in place after {:.1}s (Service {}, scheduler {scheduler}, policy {policy}); \
         opening {connections} connections from the client to each of {}",
        started.elapsed().as_secs_f64(),
        ws["status"]["serviceName"].as_str().unwrap_or(name),
        addresses.iter().map(|(path, address)| format!("{address} ({path})")).collect::<Vec<_>>().join(", "),
    ));
    let groups_spec = ws["spec"]["weights"].as_array().cloned().unwrap_or_default();
    let pods = bed.handle().list("pods", Some(namespace));
    let labels_by_pod: BTreeMap<String, Value> = pods
        .iter()
        .filter_map(|p| Some((p["metadata"]["name"].as_str()?.to_string(), p["metadata"]["labels"].clone())))
        .collect();
    let status_groups = ws["status"]["groups"].as_array().cloned().unwrap_or_default();
    let mut rows: Vec<GroupResult> = status_groups
        .iter()
        .map(|g| GroupResult {
            label: selector_label(&g["selector"]),
            selector: g["selector"].clone(),
            weight: g["weight"].as_u64(),
            pods: 0,
            desired: g["share"].as_f64().unwrap_or(0.0),
            connections: 0,
        })
        .collect();
    // Ready pods per row. Not the status' `endpoints`: a dual-stack pod is an
    // endpoint of each family.
    for pod in &pods {
        let labels = &pod["metadata"]["labels"];
        let ready = is_ready(&pod["status"]) && pod["metadata"]["deletionTimestamp"].is_null();
        if !ready || !matches(&ws["spec"]["selector"], labels) {
            continue;
        }
        let row = group_of(&groups_spec, labels).or_else(|| rows.iter().rposition(|g| g.weight.is_none()));
        if let Some(g) = row.and_then(|row| rows.get_mut(row)) {
            g.pods += 1;
        }
    }
    let mut targets = Vec::new();
    for (path, address) in addresses {
        let (counts, errors) = bed.connect_counting_errors(address, connections);
        if !errors.is_empty() {
            bail!("{} of {connections} connections to {address} ({path}) failed, e.g. {:?}", errors.len(), errors.first());
        }
        let mut groups = rows.clone();
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
        targets.push(Target { path, address, groups, total: counts.values().sum() });
    }
    print_groups(&targets);
    Ok(Measured { namespace: namespace.into(), name: name.into(), targets, converged_after })
}

/// The addresses connections to a Service go to, with their path (`clusterIP`
/// or `nodePort`), for its first TCP port: each ClusterIP, and the NodePort on
/// the node's address of each IP family the Service has (kube-proxy's proxier
/// of a family serves the NodePorts of that family's Services).
fn service_addresses(service: &Value) -> Option<Addresses> {
    let port = service["spec"]["ports"].as_array()?.iter().find(|p| p["protocol"].as_str().unwrap_or("TCP") == "TCP")?;
    let service_port = u16::try_from(port["port"].as_u64()?).ok()?;
    let ips = service_cluster_ips(service);
    if ips.is_empty() {
        return None;
    }
    let mut out: Addresses =
        ips.iter().map(|ip| ("clusterIP", SocketAddr::new(*ip, service_port))).collect();
    if let Some(node_port) = port["nodePort"].as_u64().and_then(|p| u16::try_from(p).ok()) {
        for node in [IpAddr::V4(NODE_IP), IpAddr::V6(NODE_IP6)] {
            if ips.iter().any(|ip| ip.is_ipv4() == node.is_ipv4()) {
                out.push(("nodePort", SocketAddr::new(node, node_port)));
            }
        }
    }
    Some(out)
}

/// Addresses of a Service, each with its path (`clusterIP` or `nodePort`).
type Addresses = Vec<(&'static str, SocketAddr)>;

/// The WeightedService and its Service's addresses, once its status is
/// current and Ready and the kernel's weights give the shares its status
/// states on every one of those addresses; otherwise what is still missing.
/// The addresses of an IP family no pod of the Service has an address of come
/// apart, second: their virtual services have no destinations.
fn converged(bed: &Testbed, namespace: &str, name: &str) -> Result<(Value, Addresses, Addresses), String> {
    let ws = bed.get("weightedservices", namespace, name).ok_or("no WeightedService")?;
    let status = &ws["status"];
    if status["observedGeneration"] != ws["metadata"]["generation"] {
        return Err("its status is not current".into());
    }
    if !is_ready(status) {
        return Err("it is not Ready".into());
    }
    let service_name = status["serviceName"].as_str().unwrap_or(name);
    let service = bed.get("services", namespace, service_name).ok_or_else(|| format!("no Service {service_name}"))?;
    let addresses =
        service_addresses(&service).ok_or_else(|| format!("Service {service_name} has no ClusterIP and TCP port"))?;
    let groups_spec = ws["spec"]["weights"].as_array().cloned().unwrap_or_default();
    let labels_by_ip: BTreeMap<IpAddr, Value> = bed
        .handle()
        .list("pods", Some(namespace))
        .into_iter()
        .flat_map(|p| pod_ips(&p).into_iter().map(move |ip| (ip, p["metadata"]["labels"].clone())))
        .collect();
    // Pods a manifest gives only an IPv4 address, say, leave the IPv6 virtual
    // services without destinations: nothing to measure there.
    let (addresses, unserved): (Addresses, Addresses) = addresses.into_iter().partition(|(_, vip)| {
        labels_by_ip.iter().any(|(ip, labels)| ip.is_ipv4() == vip.is_ipv4() && matches(&ws["spec"]["selector"], labels))
    });
    if addresses.is_empty() {
        return Err(format!("no pod of Service {service_name} has an address"));
    }
    let rows = status["groups"].as_array().ok_or("its status has no groups")?;
    let table = bed.ipvs();
    for (path, vip) in &addresses {
        let entry = table
            .iter()
            .find(|e| e.service.address() == Some(*vip))
            .ok_or_else(|| format!("no virtual service {vip} ({path})"))?;
        // The kernel's share per group, in the status' rows.
        let mut kernel = vec![0u64; rows.len()];
        let mut total = 0u64;
        for d in &entry.destinations {
            let labels = labels_by_ip
                .get(&d.socket_addr().ip())
                .ok_or_else(|| format!("{vip}: destination {} is no pod's", d.socket_addr()))?;
            let row = group_of(&groups_spec, labels)
                .or_else(|| rows.iter().rposition(|r| r["weight"].is_null()))
                .ok_or_else(|| format!("{vip}: destination {} is in no group", d.socket_addr()))?;
            *kernel.get_mut(row).ok_or("a group the status lacks")? += u64::from(d.weight);
            total += u64::from(d.weight);
        }
        if total == 0 {
            return Err(format!("{vip} ({path}) has no weight yet"));
        }
        let agree = rows
            .iter()
            .zip(&kernel)
            .all(|(row, w)| (row["share"].as_f64().unwrap_or(0.0) - *w as f64 / total as f64).abs() < 0.005);
        if !agree {
            return Err(format!("the kernel's weights on {vip} ({path}) do not give the status' shares yet"));
        }
    }
    Ok((ws, addresses, unserved))
}

/// How many of the agent's periodic sweeps find something to fix in [`QUIET`]
/// when nothing changes: the increase of its
/// `ipvs_operator_sweep_differences_total`.
fn quiet_sweep_differences(bed: &Testbed) -> Result<u64> {
    step(&format!(
        "leaving everything alone for {} s: do the agent's periodic sweeps find anything to fix?",
        QUIET.as_secs()
    ));
    let before = sweep_differences(bed)?;
    std::thread::sleep(QUIET);
    let after = sweep_differences(bed)?;
    let found = (after - before).max(0.0) as u64;
    let meaning = if found == 0 {
        "the kernel stayed as the agent left it"
    } else {
        "something changed the kernel meanwhile, or the agent disagrees with itself"
    };
    println!("    sweeps that found something to fix: {found} ({SWEEP_DIFFERENCES} {before} -> {after}: {meaning})");
    Ok(found)
}

/// The agent's `ipvs_operator_sweep_differences_total` now.
fn sweep_differences(bed: &Testbed) -> Result<f64> {
    sweep_differences_in(&bed.agent_metrics().context("reading the agent's /metrics")?)
}

/// `ipvs_operator_sweep_differences_total` in Prometheus text.
fn sweep_differences_in(text: &str) -> Result<f64> {
    if let Some(value) = metric(text, SWEEP_DIFFERENCES, "") {
        return Ok(value);
    }
    // A counter with labels has no sample until its first increment: its
    // `# TYPE` line (without `_total` in OpenMetrics) says it exists.
    let family = SWEEP_DIFFERENCES.trim_end_matches("_total");
    let declared = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.split_whitespace().next())
        .any(|n| n == family || n == SWEEP_DIFFERENCES);
    if declared {
        return Ok(0.0);
    }
    bail!("the agent's /metrics has no {SWEEP_DIFFERENCES}: the demo needs it to count the sweeps that fix something")
}

/// The last group of `spec.weights` whose selector matches `labels` (the
/// original's rule).
fn group_of(groups: &[Value], labels: &Value) -> Option<usize> {
    groups.iter().rposition(|g| matches(&g["selector"], labels))
}

/// Whether a status has the condition `Ready` `True`.
fn is_ready(status: &Value) -> bool {
    status["conditions"].as_array().into_iter().flatten().any(|c| c["type"] == "Ready" && c["status"] == "True")
}

/// Whether a map of labels (a Service's or group's selector) matches `labels`.
fn matches(selector: &Value, labels: &Value) -> bool {
    selector.as_object().is_some_and(|selector| selector.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

fn selector_label(selector: &Value) -> String {
    match selector.as_object() {
        Some(s) if !s.is_empty() => s.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default())).collect::<Vec<_>>().join(","),
        _ => "(no group)".into(),
    }
}

fn print_groups(targets: &[Target]) {
    let label_width = targets.iter().flat_map(|t| &t.groups).map(|g| g.label.len()).max().unwrap_or(5).max(5);
    let address_width = targets.iter().map(|t| t.address.to_string().len()).max().unwrap_or(7).max(7);
    println!(
        "    {:9}  {:address_width$}  {:label_width$}  {:>4}  {:>6}  {:>8}  {:>8}  {:>11}",
        "PATH", "ADDRESS", "GROUP", "PODS", "WEIGHT", "DESIRED", "MEASURED", "CONNECTIONS"
    );
    for t in targets {
        for g in &t.groups {
            let weight = g.weight.map(|w| w.to_string()).unwrap_or_else(|| "-".into());
            let measured = g.connections as f64 / t.total.max(1) as f64;
            println!(
                "    {:9}  {:address_width$}  {:label_width$}  {:>4}  {:>6}  {:>7.2}%  {:>7.2}%  {:>11}",
                t.path,
                t.address.to_string(),
                g.label,
                g.pods,
                weight,
                g.desired * 100.0,
                measured * 100.0,
                g.connections
            );
        }
    }
}

fn report(results: &[Measured]) -> Value {
    let groups: Vec<Value> = results
        .iter()
        .flat_map(|m| m.targets.iter().map(move |t| (m, t)))
        .flat_map(|(m, t)| {
            t.groups.iter().map(move |g| {
                json!({
                    "weightedService": format!("{}/{}", m.namespace, m.name),
                    "address": t.address.to_string(),
                    "path": t.path,
                    "selector": g.selector,
                    "desiredShare": g.desired,
                    "measuredShare": g.connections as f64 / t.total.max(1) as f64,
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
    let crds = ipvs_operator_tests::apiserver::yaml_documents(CRD_YAML)
        .iter()
        .map(|doc| serde_saphyr::from_str::<Value>(doc))
        .collect::<Result<Vec<Value>, _>>()
        .context("deploy/crd.yaml")?;
    let crd = crds
        .into_iter()
        .find(|crd| crd["spec"]["names"]["kind"] == "WeightedService")
        .context("deploy/crd.yaml has no WeightedService CRD")?;
    let version = crd["spec"]["versions"].as_array().and_then(|v| v.iter().find(|v| v["served"] == true)).cloned().unwrap_or(Value::Null);
    let columns = version["additionalPrinterColumns"].as_array().cloned().unwrap_or_default();
    let mut rows = vec![
        ["NAMESPACE".to_string(), "NAME".to_string()]
            .into_iter()
            .chain(columns.iter().map(|c| c["name"].as_str().unwrap_or_default().to_uppercase()))
            .collect::<Vec<_>>(),
    ];
    let now = k8s_openapi::jiff::Timestamp::now();
    for item in items {
        let mut row = vec![
            item["metadata"]["namespace"].as_str().unwrap_or_default().to_string(),
            item["metadata"]["name"].as_str().unwrap_or_default().to_string(),
        ];
        for c in &columns {
            let value = json_path(item, c["jsonPath"].as_str().unwrap_or_default());
            let cell = match (c["type"].as_str(), value.as_ref().and_then(Value::as_str)) {
                (Some("date"), Some(t)) => t.parse::<k8s_openapi::jiff::Timestamp>().map(|t| age(now.duration_since(t).as_secs())).unwrap_or_else(|_| t.to_string()),
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
    fn the_table_has_the_weighted_service_columns_of_deploy_crd() {
        let ws = json!({"metadata": {"namespace": "default", "name": "example"}, "status": {"serviceName": "example"}});
        let table = get_table(&[ws]).expect("the table");
        let header: Vec<&str> = table.lines().next().unwrap_or_default().split_whitespace().collect();
        assert_eq!(header, ["NAMESPACE", "NAME", "SERVICE", "POLICY", "READY", "AGE"], "{table}");
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
        // Made dual-stack and NodePort, in what is loaded too.
        assert_eq!(weighted_services[0]["spec"]["ipFamilyPolicy"], "PreferDualStack");
        assert_eq!(weighted_services[0]["spec"]["type"], "NodePort");
        assert!(kept.contains("ipFamilyPolicy: PreferDualStack") && kept.contains("type: NodePort"), "{kept}");
    }

    #[test]
    fn a_type_or_family_policy_the_manifest_gives_is_kept() {
        let text = "kind: WeightedService\nmetadata: {name: a}\nspec: {type: ClusterIP, ipFamilyPolicy: SingleStack}\n";
        let (_, weighted_services) = select_documents(text).expect("it parses");
        assert_eq!(weighted_services[0]["spec"]["type"], "ClusterIP");
        assert_eq!(weighted_services[0]["spec"]["ipFamilyPolicy"], "SingleStack");
    }

    #[test]
    fn every_cluster_ip_and_the_node_port_of_each_family_is_measured() {
        let service = json!({"spec": {
            "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00:10:96::a"],
            "ports": [
                {"protocol": "UDP", "port": 53, "nodePort": 30053},
                {"protocol": "TCP", "port": 80, "nodePort": 30080},
            ],
        }});
        let addresses: Vec<(&str, String)> =
            service_addresses(&service).unwrap().into_iter().map(|(path, a)| (path, a.to_string())).collect();
        assert_eq!(
            addresses,
            [
                ("clusterIP", "10.96.0.10:80".to_string()),
                ("clusterIP", "[fd00:10:96::a]:80".to_string()),
                ("nodePort", format!("{NODE_IP}:30080")),
                ("nodePort", format!("[{NODE_IP6}]:30080")),
            ]
        );
        // Single-stack, no NodePort: its one ClusterIP.
        let service = json!({"spec": {"clusterIP": "10.96.0.11", "ports": [{"port": 80}]}});
        assert_eq!(service_addresses(&service).unwrap(), [("clusterIP", "10.96.0.11:80".parse().unwrap())]);
        let headless = json!({"spec": {"clusterIP": "None", "ports": [{"port": 80}]}});
        assert_eq!(service_addresses(&headless), None);
    }

    #[test]
    fn sweep_differences_are_read_and_a_missing_counter_fails() {
        let text = "# TYPE ipvs_operator_sweep_differences counter\nipvs_operator_sweep_differences_total 3\n";
        assert_eq!(sweep_differences_in(text).unwrap(), 3.0);
        // Declared, with labels and no sample yet.
        assert_eq!(sweep_differences_in("# TYPE ipvs_operator_sweep_differences counter\n").unwrap(), 0.0);
        let missing = sweep_differences_in("ipvs_operator_drift_repairs_total 1\n").unwrap_err();
        assert!(missing.to_string().contains(SWEEP_DIFFERENCES), "{missing}");
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
