//! Consistency checks for end-to-end runs under faults and churn, on a
//! [`Testbed`] in the test VM.
//!
//! Two checks, as independent of the agent as a check can be that uses the
//! policies themselves:
//!
//! - **The kernel equals `ipvs-operator eval`.** [`expected_weights`] fetches a
//!   WeightedService, the pods of its namespace and the Nodes from the test API
//!   server, writes them to files and runs the real `ipvs-operator eval
//!   --weighted-service F --pods F --node node-1 -o json` binary (with the
//!   testbed's `--policy-dir`). [`kernel_mismatches`] compares every ready
//!   endpoint's destination on every virtual service of the WeightedService's
//!   Service (ClusterIP, external and load-balancer IPs, NodePorts on the node
//!   address) and the scheduler with that. [`wait_for_kernel_to_match_eval`]
//!   retries until they agree (the agent converges asynchronously) and panics
//!   with the differences otherwise.
//! - **No ready endpoint at weight 0.** A [`Sampler`] reads the node's IPVS
//!   table every 100 ms on a thread of its own, and flags every destination at
//!   weight 0 whose endpoint is ready (ready and not terminating in its
//!   Service's EndpointSlice, both just before and just after the kernel was
//!   read) and has been for [`SamplerConfig::ready_grace`] — kube-proxy adds a
//!   new or returning endpoint asynchronously, and drains removed ones at 0 —
//!   unless the policy said 0: the config's `zero_allowed` predicate accepts
//!   it, or `ipvs-operator eval` on the objects of that moment gives 0.
//!
//! What they share with the agent, exactly, and so cannot catch:
//!
//! - `ipvs-operator eval` is the release binary: the policy engine
//!   (`host/src/policy`), the policy modules, the snapshot a policy sees
//!   (`host/src/snapshot.rs`: endpoints from pods, zones from Nodes) and the
//!   WeightedService types (`host/src/crd.rs`). A bug there gives both sides
//!   the same wrong weights.
//! - The kernel is read with the `ipvs` crate's `IpvsClient` (its netlink
//!   parsing is the agent's); `ipvsadm -Ln`, an independent reader, is only
//!   printed with a failure.
//!
//! What they do not share: which virtual services belong to a Service (its
//! addresses and ports are listed here from the API objects, not by the
//! agent's `Matcher`), which endpoints are ready (from the EndpointSlices, not
//! the agent's caches), the pods `eval` is given (read from the API server at
//! that moment, not from the agent's watches), and every write, drift
//! comparison and sweep of the agent.
//!
//! ```no_run
//! use std::time::Duration;
//! use ipvs_operator_tests::consistency::{wait_for_kernel_to_match_eval, Sampler, SamplerConfig};
//! # fn run(bed: &ipvs_operator_tests::testbed::Testbed) {
//! let sampler = Sampler::start(bed, SamplerConfig::default());
//! // … faults, churn …
//! let report = sampler.finish();
//! eprintln!("{}", report.summary());
//! report.assert_clean(); // panics naming each destination, its pod and when
//! wait_for_kernel_to_match_eval(bed, "default", "example", Duration::from_secs(60));
//! # }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ipvs::{IpvsClient, ServiceEntry, ServiceKey};
use serde_json::Value;
use traffic::netns::project_binary;

use crate::apiserver::Handle;
use crate::testbed::{policy_cache_dir, Testbed, NODE_IP, NODE_NAME};

/// How to run `ipvs-operator eval` as the testbed's agent evaluates.
#[derive(Debug, Clone)]
pub struct EvalSetup {
    /// `--node`: the agent's node.
    pub node: String,
    /// The node's addresses, where NodePort virtual services are.
    pub node_addresses: Vec<IpAddr>,
    /// `--policy-dir`, when the testbed has one.
    pub policy_dir: Option<PathBuf>,
    /// `--policy-timeout`: generous, because the VM's CPU is emulated and eval
    /// is the oracle here, not the thing tested.
    pub policy_timeout: Duration,
}

impl EvalSetup {
    /// As `bed`'s agent runs.
    pub fn of(bed: &Testbed) -> Self {
        EvalSetup {
            node: NODE_NAME.into(),
            node_addresses: vec![IpAddr::V4(NODE_IP)],
            policy_dir: bed.config().policy_dir.clone(),
            policy_timeout: Duration::from_secs(5),
        }
    }
}

/// A virtual service: protocol (`TCP`, `UDP`, `SCTP`) and address.
pub type VirtualService = (String, SocketAddr);

/// What `eval` says the kernel should hold for one WeightedService.
#[derive(Debug, Clone)]
pub struct Expected {
    /// `namespace/name`.
    pub weighted_service: String,
    /// The scheduler (`spec.scheduler`, `wrr` when absent).
    pub scheduler: String,
    /// Per virtual service, per destination of a ready endpoint: its pod and weight.
    pub weights: BTreeMap<VirtualService, BTreeMap<SocketAddr, (String, u32)>>,
    /// The API server's resourceVersion the objects were read at.
    pub resource_version: u64,
    /// eval's JSON report.
    pub report: Value,
}

/// The objects eval reads, as files.
fn with_kind(mut object: Value, api_version: &str, kind: &str) -> Value {
    object["apiVersion"] = Value::from(api_version);
    object["kind"] = Value::from(kind);
    object
}

/// Run `ipvs-operator eval` on the current objects of WeightedService
/// `namespace/name` and say what each ready endpoint's destination should weigh.
pub fn expected_weights(handle: &Handle, setup: &EvalSetup, namespace: &str, name: &str) -> Result<Expected, String> {
    let resource_version = handle.resource_version();
    let ws = handle
        .get("weightedservices", namespace, name)
        .ok_or_else(|| format!("no WeightedService {namespace}/{name}"))?;
    let service = handle
        .get("services", namespace, name)
        .ok_or_else(|| format!("no Service {namespace}/{name} (the WeightedService's)"))?;
    let pods = handle.list("pods", Some(namespace));
    let nodes = handle.list("nodes", None);
    let dir = tempfile::Builder::new().prefix("eval-").tempdir().map_err(|e| e.to_string())?;
    let ws_file = dir.path().join("weighted-service.yaml");
    let pods_file = dir.path().join("pods.yaml");
    let ws_doc = with_kind(ws.clone(), "codesink.net/v1alpha1", "WeightedService");
    std::fs::write(&ws_file, ws_doc.to_string()).map_err(|e| e.to_string())?;
    let docs: Vec<String> = pods
        .iter()
        .map(|p| with_kind(p.clone(), "v1", "Pod").to_string())
        .chain(nodes.iter().map(|n| with_kind(n.clone(), "v1", "Node").to_string()))
        .collect();
    std::fs::write(&pods_file, docs.join("\n---\n")).map_err(|e| e.to_string())?;
    let mut command = Command::new(project_binary("ipvs-operator"));
    command
        .arg("eval")
        .arg("--weighted-service")
        .arg(&ws_file)
        .arg("--pods")
        .arg(&pods_file)
        .args(["--node", &setup.node, "-o", "json"])
        .args(["--policy-timeout", &format!("{}ms", setup.policy_timeout.as_millis())])
        .env("IPVS_OPERATOR_POLICY_CACHE", policy_cache_dir());
    if let Some(dir) = &setup.policy_dir {
        command.arg("--policy-dir").arg(dir);
    }
    let out = command.output().map_err(|e| format!("running ipvs-operator eval: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ipvs-operator eval of {namespace}/{name} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let report: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("eval's JSON: {e}: {}", String::from_utf8_lossy(&out.stdout)))?;

    // Ready endpoints: what the agent sets weights on.
    let ready: BTreeMap<&str, bool> = pods
        .iter()
        .filter_map(|p| {
            let name = p["metadata"]["name"].as_str()?;
            let ready = p["status"]["conditions"]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"));
            Some((name, ready && p["metadata"]["deletionTimestamp"].is_null()))
        })
        .collect();
    let virtual_services = service_virtual_services(&service, &setup.node_addresses);
    let mut weights: BTreeMap<VirtualService, BTreeMap<SocketAddr, (String, u32)>> = BTreeMap::new();
    for row in report["weights"].as_array().into_iter().flatten() {
        let pod = row["pod"].as_str().unwrap_or_default();
        if !ready.get(pod).copied().unwrap_or(false) {
            continue;
        }
        let (Some(ip), Some(port), Some(service_port), Some(protocol), Some(weight)) = (
            row["ip"].as_str().and_then(|ip| ip.parse::<IpAddr>().ok()),
            row["port"].as_u64().and_then(|p| u16::try_from(p).ok()),
            row["servicePort"].as_u64().and_then(|p| u16::try_from(p).ok()),
            row["protocol"].as_str(),
            row["weight"].as_u64(),
        ) else {
            return Err(format!("eval's row does not parse: {row}"));
        };
        for ((proto, vs), sp) in &virtual_services {
            if *sp == service_port && proto == protocol {
                weights
                    .entry((proto.clone(), *vs))
                    .or_default()
                    .insert(SocketAddr::new(ip, port), (pod.to_string(), weight as u32));
            }
        }
    }
    let scheduler = ws["spec"]["scheduler"].as_str().filter(|s| !s.is_empty()).unwrap_or("wrr").to_string();
    Ok(Expected { weighted_service: format!("{namespace}/{name}"), scheduler, weights, resource_version, report })
}

/// Every virtual service kube-proxy makes for `service` on a node with
/// `node_addresses`, with the Service port each one serves.
pub fn service_virtual_services(service: &Value, node_addresses: &[IpAddr]) -> Vec<(VirtualService, u16)> {
    let spec = &service["spec"];
    let mut ips: Vec<IpAddr> = Vec::new();
    for ip in spec["clusterIPs"].as_array().into_iter().flatten().chain(std::iter::once(&spec["clusterIP"])) {
        if let Some(ip) = ip.as_str().and_then(|ip| ip.parse().ok()) {
            ips.push(ip);
        }
    }
    for ip in spec["externalIPs"].as_array().into_iter().flatten() {
        if let Some(ip) = ip.as_str().and_then(|ip| ip.parse().ok()) {
            ips.push(ip);
        }
    }
    for ingress in service["status"]["loadBalancer"]["ingress"].as_array().into_iter().flatten() {
        if let Some(ip) = ingress["ip"].as_str().and_then(|ip| ip.parse().ok()) {
            ips.push(ip);
        }
    }
    ips.sort();
    ips.dedup();
    let mut out = Vec::new();
    for port in spec["ports"].as_array().into_iter().flatten() {
        let protocol = port["protocol"].as_str().unwrap_or("TCP").to_string();
        let Some(service_port) = port["port"].as_u64().and_then(|p| u16::try_from(p).ok()) else { continue };
        for ip in &ips {
            out.push(((protocol.clone(), SocketAddr::new(*ip, service_port)), service_port));
        }
        if let Some(node_port) = port["nodePort"].as_u64().and_then(|p| u16::try_from(p).ok()) {
            for ip in node_addresses {
                out.push(((protocol.clone(), SocketAddr::new(*ip, node_port)), service_port));
            }
        }
    }
    out
}

fn entry_key(entry: &ServiceEntry) -> Option<VirtualService> {
    match entry.service.key {
        ServiceKey::Address { protocol, address, port } => Some((protocol.to_string(), SocketAddr::new(address, port))),
        ServiceKey::Fwmark { .. } => None,
    }
}

/// Where the kernel's table differs from `expected`, one line each (empty: it
/// agrees). Destinations of endpoints that are not ready are kube-proxy's and
/// not compared.
pub fn kernel_mismatches(table: &[ServiceEntry], expected: &Expected) -> Vec<String> {
    let by_key: HashMap<VirtualService, &ServiceEntry> = table.iter().filter_map(|e| Some((entry_key(e)?, e))).collect();
    let mut out = Vec::new();
    for ((protocol, vs), destinations) in &expected.weights {
        let Some(entry) = by_key.get(&(protocol.clone(), *vs)) else {
            out.push(format!("{protocol} {vs}: no such virtual service in the kernel"));
            continue;
        };
        if entry.service.scheduler != expected.scheduler {
            out.push(format!(
                "{protocol} {vs}: scheduler {} in the kernel, {} expected",
                entry.service.scheduler, expected.scheduler
            ));
        }
        let kernel: HashMap<SocketAddr, u32> = entry.destinations.iter().map(|d| (d.socket_addr(), d.weight)).collect();
        for (dest, (pod, weight)) in destinations {
            match kernel.get(dest) {
                None => out.push(format!("{protocol} {vs} -> {dest} (pod {pod}): missing in the kernel, eval says weight {weight}")),
                Some(w) if w != weight => {
                    out.push(format!("{protocol} {vs} -> {dest} (pod {pod}): weight {w} in the kernel, eval says {weight}"))
                }
                Some(_) => {}
            }
        }
    }
    out
}

/// Wait until the kernel of `bed`'s node holds what `ipvs-operator eval`
/// computes for WeightedService `namespace/name` from the API server's current
/// objects (evaluated again on every try, so changes in flight are fine), or
/// panic after `timeout` with the differences. Returns what matched.
pub fn wait_for_kernel_to_match_eval(bed: &Testbed, namespace: &str, name: &str, timeout: Duration) -> Expected {
    let setup = EvalSetup::of(bed);
    let started = Instant::now();
    loop {
        let last = match expected_weights(bed.handle(), &setup, namespace, name) {
            Ok(expected) => {
                let mismatches = kernel_mismatches(&bed.ipvs(), &expected);
                if mismatches.is_empty() && !expected.weights.is_empty() {
                    return expected;
                }
                if expected.weights.is_empty() {
                    "eval gave no ready endpoint on any virtual service".to_string()
                } else {
                    mismatches.join("\n  ")
                }
            }
            Err(e) => e,
        };
        assert!(
            started.elapsed() < timeout,
            "after {timeout:?} the kernel still differs from ipvs-operator eval for {namespace}/{name}:\n  {last}\nipvsadm -Ln:\n{}",
            bed.ipvsadm()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A destination at weight 0 seen by the [`Sampler`].
#[derive(Debug, Clone)]
pub struct ZeroSeen {
    /// The virtual service.
    pub virtual_service: VirtualService,
    /// The destination.
    pub destination: SocketAddr,
    /// The Service's `namespace/name`.
    pub service: String,
    /// The endpoint's pod (`namespace/name`), from the EndpointSlice.
    pub pod: String,
}

/// A predicate: the policy said 0 for this destination.
pub type ZeroAllowed = Arc<dyn Fn(&ZeroSeen) -> bool + Send + Sync>;

/// How a [`Sampler`] samples.
#[derive(Clone)]
pub struct SamplerConfig {
    /// Between two reads of the kernel.
    pub interval: Duration,
    /// How long an endpoint must have been seen ready before a weight 0 on it
    /// counts: kube-proxy adds a new or returning endpoint asynchronously.
    pub ready_grace: Duration,
    /// Zeros the policy gives (e.g. a rollout at 0 %); `None`: none.
    pub zero_allowed: Option<ZeroAllowed>,
    /// When no predicate allows a zero, ask `ipvs-operator eval` (on the
    /// objects of that moment) whether the policy gives 0; `None`: don't.
    pub confirm_with_eval: Option<EvalSetup>,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            interval: Duration::from_millis(100),
            ready_grace: Duration::from_secs(3),
            zero_allowed: None,
            confirm_with_eval: None,
        }
    }
}

/// A weight 0 on a ready endpoint that no policy asked for.
#[derive(Debug, Clone)]
pub struct Violation {
    /// Since the sampler started.
    pub at: Duration,
    /// Wall-clock time (RFC 3339), to line up with the processes' logs.
    pub wall: String,
    /// What was seen.
    pub zero: ZeroSeen,
    /// How long the endpoint had been ready (as sampled).
    pub ready_for: Duration,
}

/// What a [`Sampler`] saw.
#[derive(Debug, Clone, Default)]
pub struct SamplerReport {
    /// Kernel reads.
    pub samples: usize,
    /// Destinations checked, summed over the samples.
    pub destinations_checked: usize,
    /// The longest time between two reads.
    pub longest_gap: Duration,
    /// How long it ran.
    pub elapsed: Duration,
    /// Zeros on ready endpoints the policy did not ask for.
    pub violations: Vec<Violation>,
    /// Zeros on ready endpoints that the policy did ask for.
    pub allowed_zeros: usize,
    /// Reads that failed (kept, not fatal: the table can change mid-dump).
    pub errors: Vec<String>,
}

impl SamplerReport {
    /// One line for the test's output.
    pub fn summary(&self) -> String {
        format!(
            "sampler: {} kernel reads in {:.1} s ({} destinations checked), longest gap {} ms, {} violations, {} zeros the policy gave, {} read errors",
            self.samples,
            self.elapsed.as_secs_f64(),
            self.destinations_checked,
            self.longest_gap.as_millis(),
            self.violations.len(),
            self.allowed_zeros,
            self.errors.len()
        )
    }

    /// Panic, naming each violation (first 20), if any ready endpoint was at
    /// weight 0 without the policy saying so, or if nothing was sampled.
    pub fn assert_clean(&self) {
        assert!(self.samples > 0, "the sampler never read the kernel: {:?}", self.errors);
        if self.violations.is_empty() {
            return;
        }
        let mut text = String::new();
        for v in self.violations.iter().take(20) {
            let _ = writeln!(
                text,
                "  at +{:.1}s ({}): {} {} -> {} (pod {}, Service {}) at weight 0, ready for {:.1}s",
                v.at.as_secs_f64(),
                v.wall,
                v.zero.virtual_service.0,
                v.zero.virtual_service.1,
                v.zero.destination,
                v.zero.pod,
                v.zero.service,
                v.ready_for.as_secs_f64()
            );
        }
        panic!(
            "{} samples had a ready endpoint at weight 0 that no policy asked for ({}):\n{text}",
            self.violations.len(),
            self.summary()
        );
    }
}

/// Reads the kernel every [`SamplerConfig::interval`] on its own thread until
/// [`Sampler::finish`]; see the module's documentation.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    report: Arc<Mutex<SamplerReport>>,
    thread: Option<JoinHandle<()>>,
}

/// A ready endpoint of a Service, as an EndpointSlice says.
struct ReadyEndpoint {
    pod: String,
    /// Ports (protocol, port) it serves.
    ports: Vec<(String, u16)>,
}

/// The Services' virtual services and their ready endpoints, at one moment.
struct View {
    /// Virtual service → (Service `ns/name`, Service port).
    services: HashMap<VirtualService, (String, u16)>,
    /// (Service `ns/name`, address) → the endpoint, when ready.
    ready: HashMap<(String, IpAddr), ReadyEndpoint>,
}

fn view(handle: &Handle, node_addresses: &[IpAddr]) -> View {
    let mut services = HashMap::new();
    for service in handle.list("services", None) {
        let id = format!(
            "{}/{}",
            service["metadata"]["namespace"].as_str().unwrap_or_default(),
            service["metadata"]["name"].as_str().unwrap_or_default()
        );
        for (vs, port) in service_virtual_services(&service, node_addresses) {
            services.insert(vs, (id.clone(), port));
        }
    }
    let mut ready = HashMap::new();
    for slice in handle.list("endpointslices", None) {
        let (Some(namespace), Some(service)) = (
            slice["metadata"]["namespace"].as_str(),
            slice["metadata"]["labels"]["kubernetes.io/service-name"].as_str(),
        ) else {
            continue;
        };
        let id = format!("{namespace}/{service}");
        let ports: Vec<(String, u16)> = slice["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| {
                Some((p["protocol"].as_str().unwrap_or("TCP").to_string(), u16::try_from(p["port"].as_u64()?).ok()?))
            })
            .collect();
        for endpoint in slice["endpoints"].as_array().into_iter().flatten() {
            let conditions = &endpoint["conditions"];
            let is_ready = conditions["ready"] != Value::Bool(false) && conditions["terminating"] != Value::Bool(true);
            if !is_ready {
                continue;
            }
            let pod = format!(
                "{}/{}",
                endpoint["targetRef"]["namespace"].as_str().unwrap_or(namespace),
                endpoint["targetRef"]["name"].as_str().unwrap_or("?")
            );
            for address in endpoint["addresses"].as_array().into_iter().flatten() {
                if let Some(ip) = address.as_str().and_then(|a| a.parse().ok()) {
                    ready.insert((id.clone(), ip), ReadyEndpoint { pod: pod.clone(), ports: ports.clone() });
                }
            }
        }
    }
    View { services, ready }
}

impl View {
    /// The ready endpoint behind `destination` of `vs`, with its Service.
    fn ready_endpoint(&self, vs: &VirtualService, destination: SocketAddr) -> Option<(&str, u16, &ReadyEndpoint)> {
        let (service, service_port) = self.services.get(vs)?;
        let endpoint = self.ready.get(&(service.clone(), destination.ip()))?;
        endpoint
            .ports
            .iter()
            .any(|(protocol, port)| *protocol == vs.0 && *port == destination.port())
            .then_some((service.as_str(), *service_port, endpoint))
    }
}

impl Sampler {
    /// Start sampling `bed`'s node.
    pub fn start(bed: &Testbed, config: SamplerConfig) -> Sampler {
        let client = bed.node.enter(|| IpvsClient::new().expect("IPVS in the node"));
        let handle = bed.handle().clone();
        let node_addresses = vec![IpAddr::V4(NODE_IP)];
        let stop = Arc::new(AtomicBool::new(false));
        let report = Arc::new(Mutex::new(SamplerReport::default()));
        let thread = {
            let (stop, report) = (stop.clone(), report.clone());
            std::thread::Builder::new()
                .name("ipvs-sampler".into())
                .spawn(move || sample(client, handle, node_addresses, config, &stop, &report))
                .expect("the sampler thread")
        };
        Sampler { stop, report, thread: Some(thread) }
    }

    /// What it saw so far.
    pub fn report(&self) -> SamplerReport {
        self.report.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Stop and say what it saw.
    pub fn finish(mut self) -> SamplerReport {
        self.stop_thread();
        self.report()
    }

    fn stop_thread(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

fn sample(
    mut client: IpvsClient,
    handle: Handle,
    node_addresses: Vec<IpAddr>,
    config: SamplerConfig,
    stop: &AtomicBool,
    report: &Mutex<SamplerReport>,
) {
    let started = Instant::now();
    let mut last_read: Option<Instant> = None;
    // (Service, address) → since when it has been seen ready in every sample.
    let mut ready_since: HashMap<(String, IpAddr), Instant> = HashMap::new();
    // Zeros eval was asked about, at an API resourceVersion: (vs, destination, rv) → eval said 0.
    let mut confirmed: HashMap<(VirtualService, SocketAddr, u64), bool> = HashMap::new();
    while !stop.load(Ordering::Relaxed) {
        let tick = Instant::now();
        let before = view(&handle, &node_addresses);
        let table = client.dump();
        let read_at = Instant::now();
        let after = view(&handle, &node_addresses);
        let mut r = report.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(last) = last_read {
            r.longest_gap = r.longest_gap.max(read_at - last);
        }
        last_read = Some(read_at);
        r.elapsed = started.elapsed();
        let table = match table {
            Ok(t) => t,
            Err(e) => {
                r.errors.push(format!("+{:.1}s: {e}", started.elapsed().as_secs_f64()));
                drop(r);
                std::thread::sleep(config.interval.saturating_sub(tick.elapsed()));
                continue;
            }
        };
        r.samples += 1;
        // Ready in both views: ready throughout the read.
        ready_since.retain(|key, _| before.ready.contains_key(key) && after.ready.contains_key(key));
        for key in after.ready.keys() {
            if before.ready.contains_key(key) {
                ready_since.entry(key.clone()).or_insert(read_at);
            }
        }
        let mut candidates = Vec::new();
        for entry in &table {
            let Some(vs) = entry_key(entry) else { continue };
            for dest in &entry.destinations {
                let destination = dest.socket_addr();
                let Some((service, _, endpoint)) = after.ready_endpoint(&vs, destination) else { continue };
                if before.ready_endpoint(&vs, destination).is_none() {
                    continue;
                }
                r.destinations_checked += 1;
                if dest.weight != 0 {
                    continue;
                }
                let since = ready_since.get(&(service.to_string(), destination.ip())).copied().unwrap_or(read_at);
                let ready_for = read_at - since;
                if ready_for < config.ready_grace {
                    continue;
                }
                candidates.push((
                    ZeroSeen { virtual_service: vs.clone(), destination, service: service.to_string(), pod: endpoint.pod.clone() },
                    ready_for,
                ));
            }
        }
        drop(r);
        for (zero, ready_for) in candidates {
            let mut allowed = config.zero_allowed.as_ref().is_some_and(|f| f(&zero));
            if !allowed && let Some(setup) = &config.confirm_with_eval {
                let rv = handle.resource_version();
                let key = (zero.virtual_service.clone(), zero.destination, rv);
                allowed = *confirmed.entry(key).or_insert_with(|| eval_says_zero(&handle, setup, &zero));
            }
            let mut r = report.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if allowed {
                r.allowed_zeros += 1;
            } else {
                r.violations.push(Violation {
                    at: read_at - started,
                    wall: jiff::Timestamp::now().to_string(),
                    zero,
                    ready_for,
                });
            }
        }
        std::thread::sleep(config.interval.saturating_sub(tick.elapsed()));
    }
}

/// Whether eval, on the objects of now, gives `zero.destination` weight 0 on
/// its virtual service (the WeightedService is named as its Service).
fn eval_says_zero(handle: &Handle, setup: &EvalSetup, zero: &ZeroSeen) -> bool {
    let Some((namespace, name)) = zero.service.split_once('/') else { return false };
    match expected_weights(handle, setup, namespace, name) {
        Ok(expected) => expected
            .weights
            .get(&zero.virtual_service)
            .and_then(|d| d.get(&zero.destination))
            .is_some_and(|(_, w)| *w == 0),
        Err(_) => false,
    }
}
