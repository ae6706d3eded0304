//! Consistency checks for end-to-end runs under faults and churn, on a
//! [`Testbed`] in the test VM.
//!
//! Five checks, as independent of the agent as a check can be that uses the
//! policies themselves:
//!
//! - **What agents see of pods is the pods.** Agents do not watch pods: the
//!   controller publishes their labels, creation and ready-since times in
//!   PodInfoSlices. [`pod_info_mismatches`] compares those with the pods the
//!   API server has; [`wait_for_kernel_to_match_eval`] waits for both.
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
//! - **A drained terminating endpoint stays drained.** Once kube-proxy has set
//!   the destination of a terminating endpoint to weight 0, no later sample may
//!   show that destination above 0 (see "Coexisting with kube-proxy" in
//!   DESIGN.md: the agent never raises a weight 0 it did not write, since its
//!   watches may be behind kube-proxy's). The same [`Sampler`] checks it with a
//!   [`DrainTracker`], a pure function of the samples: see there for what
//!   counts as such a drain and what starts a destination afresh.
//!
//! - **Nothing the agent made outlives its Service** (standalone mode).
//!   [`standalone_orphans`] lists every virtual service the agent would call
//!   its own — at an address on `ipvs-op0` (read with `ip`) or recorded in its
//!   nftables table (read with `nft -j`), or any at all on a node without
//!   kube-proxy — that belongs to no Service labelled for ipvs-operator (from
//!   the API objects). Check it where nothing is being handed over to kube-proxy.
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
use crate::testbed::{policy_cache_dir, Testbed, NODE_ADDRESSES, NODE_NAME};

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
            node_addresses: NODE_ADDRESSES.to_vec(),
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
            // Each family's virtual services hold that family's endpoints.
            if *sp == service_port && proto == protocol && vs.is_ipv4() == ip.is_ipv4() {
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
/// `node_addresses`, with the Service port each one serves: NodePorts on the
/// node addresses of the Service's IP families only (kube-proxy's proxier of
/// a family serves that family's Services).
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
    let families: Vec<bool> = ips.iter().map(IpAddr::is_ipv4).collect();
    let mut out = Vec::new();
    for port in spec["ports"].as_array().into_iter().flatten() {
        let protocol = port["protocol"].as_str().unwrap_or("TCP").to_string();
        let Some(service_port) = port["port"].as_u64().and_then(|p| u16::try_from(p).ok()) else { continue };
        for ip in &ips {
            out.push(((protocol.clone(), SocketAddr::new(*ip, service_port)), service_port));
        }
        if let Some(node_port) = port["nodePort"].as_u64().and_then(|p| u16::try_from(p).ok()) {
            for ip in node_addresses.iter().filter(|ip| families.contains(&ip.is_ipv4())) {
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

/// How the PodInfoSlices the controller published for WeightedService
/// `namespace/name` differ from its pods as the API server has them now: a pod
/// its selector matches that is missing, or whose labels, creation or
/// ready-since time (its Ready condition's transition, when Ready) differ.
/// Agents see pods only through these: a slice left behind (a change the
/// controller missed, say while its pod watch relisted) freezes the agents'
/// view of that pod. Pods listed that the selector does not match are not
/// counted (a Service without a selector lists pods its slices name).
pub fn pod_info_mismatches(handle: &Handle, namespace: &str, name: &str) -> Vec<String> {
    let Some(ws) = handle.get("weightedservices", namespace, name) else {
        return vec![format!("no WeightedService {namespace}/{name}")];
    };
    let selector = ws["spec"]["selector"].as_object().cloned().unwrap_or_default();
    if selector.is_empty() {
        return Vec::new();
    }
    let published: std::collections::BTreeMap<String, Value> = handle
        .list("podinfoslices", Some(namespace))
        .iter()
        .filter(|s| s["metadata"]["labels"]["codesink.net/weighted-service"] == name)
        .flat_map(pod_info_entries)
        .collect();
    let mut out = Vec::new();
    for (pod, entry) in &published {
        if entry.get("labels").is_none() {
            out.push(format!("pod {namespace}/{pod}: its PodInfoSlice entry names a label set the slice lacks: {entry}"));
        }
    }
    for pod in handle.list("pods", Some(namespace)) {
        let labels = &pod["metadata"]["labels"];
        if !selector.iter().all(|(k, v)| &labels[k] == v) {
            continue;
        }
        let pod_name = pod["metadata"]["name"].as_str().unwrap_or_default();
        let Some(info) = published.get(pod_name) else {
            out.push(format!("pod {namespace}/{pod_name} is in no PodInfoSlice of {name}"));
            continue;
        };
        let ready = pod["status"]["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == "Ready" && c["status"] == "True"))
            .map(|c| c["lastTransitionTime"].clone())
            .unwrap_or(Value::Null);
            let empty = || Value::Object(Default::default());
        let published_labels = if info["labels"].is_null() { empty() } else { info["labels"].clone() };
        let labels = if labels.is_null() { empty() } else { labels.clone() };
        for (what, published, actual) in [
            ("labels", published_labels, labels),
            ("creation", info["created"].clone(), pod["metadata"]["creationTimestamp"].clone()),
            ("ready-since", info["readySince"].clone(), ready),
        ] {
            if published != actual {
                out.push(format!("pod {namespace}/{pod_name}: {what} published {published}, the pod has {actual}"));
            }
        }
    }
    out
}

/// The pod entries of a PodInfoSlice as JSON, by pod name, each with its
/// label set resolved into `labels` (left out where the slice lacks the set
/// the entry names).
pub fn pod_info_entries(slice: &Value) -> Vec<(String, Value)> {
    let sets = slice["spec"]["labelSets"].as_array().cloned().unwrap_or_default();
    let entries = slice["spec"]["pods"].as_array().cloned().unwrap_or_default();
    entries
        .into_iter()
        .map(|mut entry| {
            let index = entry["labelSet"].as_u64().unwrap_or(0) as usize;
            if let (Some(labels), Some(fields)) = (sets.get(index), entry.as_object_mut()) {
                fields.insert("labels".into(), labels.clone());
            }
            (entry["name"].as_str().unwrap_or_default().to_string(), entry)
        })
        .collect()
}

/// Wait until the kernel of `bed`'s node holds what `ipvs-operator eval`
/// computes for WeightedService `namespace/name` from the API server's current
/// objects (evaluated again on every try, so changes in flight are fine), and
/// the published PodInfoSlices match the pods ([`pod_info_mismatches`]), or
/// panic after `timeout` with the differences. Returns what matched.
pub fn wait_for_kernel_to_match_eval(bed: &Testbed, namespace: &str, name: &str, timeout: Duration) -> Expected {
    let setup = EvalSetup::of(bed);
    let started = Instant::now();
    loop {
        let last = match expected_weights(bed.handle(), &setup, namespace, name) {
            Ok(expected) => {
                let mut mismatches = kernel_mismatches(&bed.ipvs(), &expected);
                mismatches.extend(pod_info_mismatches(bed.handle(), namespace, name));
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

/// A destination seen by the [`Sampler`] (at weight 0, for the first check).
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

/// What the [`Sampler`] saw that must not be.
#[derive(Debug, Clone)]
pub struct Violation {
    /// Since the sampler started.
    pub at: Duration,
    /// Wall-clock time (RFC 3339), to line up with the processes' logs.
    pub wall: String,
    /// The destination, its Service and its endpoint's pod.
    pub seen: ZeroSeen,
    /// Which check, and what it saw.
    pub kind: ViolationKind,
}

/// The check a [`Violation`] failed.
#[derive(Debug, Clone)]
pub enum ViolationKind {
    /// A ready endpoint at weight 0 that no policy asked for.
    ZeroOnReady {
        /// How long the endpoint had been ready (as sampled).
        ready_for: Duration,
    },
    /// A destination kube-proxy had drained at weight 0 for its terminating
    /// endpoint, above 0 again (see [`DrainTracker`]).
    DrainRevived {
        /// The pod's uid.
        uid: String,
        /// When the drain was first seen, since the sampler started.
        zeroed_at: Duration,
        /// The destination's weights in the samples, repeats folded (the last
        /// few), e.g. `[10, 0, 10]`.
        weights: Vec<u32>,
    },
}

impl Violation {
    /// One line: when, what, and why it is wrong.
    pub fn describe(&self) -> String {
        let (vs, s) = (&self.seen.virtual_service, &self.seen);
        let head = format!("at +{:.1}s ({}): {} {} -> {}", self.at.as_secs_f64(), self.wall, vs.0, vs.1, s.destination);
        match &self.kind {
            ViolationKind::ZeroOnReady { ready_for } => format!(
                "{head} (pod {}, Service {}) at weight 0, ready for {:.1}s",
                s.pod,
                s.service,
                ready_for.as_secs_f64()
            ),
            ViolationKind::DrainRevived { uid, zeroed_at, weights } => format!(
                "{head} (pod {} uid {uid}, Service {}) at weight {} again, after kube-proxy drained it at 0 for the \
                 terminating pod (seen at +{:.1}s); weights seen: {}",
                s.pod,
                s.service,
                weights.last().copied().unwrap_or_default(),
                zeroed_at.as_secs_f64(),
                weights.iter().map(u32::to_string).collect::<Vec<_>>().join(" → ")
            ),
        }
    }
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
    /// Zeros on ready endpoints the policy did not ask for, and drained
    /// terminating endpoints above 0 again.
    pub violations: Vec<Violation>,
    /// Zeros on ready endpoints that the policy did ask for.
    pub allowed_zeros: usize,
    /// Destinations kube-proxy drained at weight 0 for their terminating pods.
    pub drains: Vec<Drain>,
    /// Reads that failed (kept, not fatal: the table can change mid-dump).
    pub errors: Vec<String>,
}

impl SamplerReport {
    /// The violations of one check: ready endpoints at 0 (`false`) or drains revived (`true`).
    fn count(&self, revived: bool) -> usize {
        self.violations.iter().filter(|v| matches!(v.kind, ViolationKind::DrainRevived { .. }) == revived).count()
    }

    /// One line for the test's output.
    pub fn summary(&self) -> String {
        format!(
            "sampler: {} kernel reads in {:.1} s ({} destinations checked), longest gap {} ms, {} violations ({} \
             ready endpoints at 0, {} drains revived), {} zeros the policy gave, {} drains of terminating endpoints, \
             {} read errors",
            self.samples,
            self.elapsed.as_secs_f64(),
            self.destinations_checked,
            self.longest_gap.as_millis(),
            self.violations.len(),
            self.count(false),
            self.count(true),
            self.allowed_zeros,
            self.drains.len(),
            self.errors.len()
        )
    }

    /// Panic, naming each violation (first 20), if any ready endpoint was at
    /// weight 0 without the policy saying so, if any destination kube-proxy
    /// drained for its terminating endpoint was above 0 again, or if nothing
    /// was sampled.
    pub fn assert_clean(&self) {
        assert!(self.samples > 0, "the sampler never read the kernel: {:?}", self.errors);
        if self.violations.is_empty() {
            return;
        }
        let mut text = String::new();
        for v in self.violations.iter().take(20) {
            let _ = writeln!(text, "  {}", v.describe());
        }
        panic!(
            "{} violations: {} samples had a ready endpoint at weight 0 that no policy asked for, {} destinations \
             drained for a terminating endpoint were raised again ({}):\n{text}",
            self.violations.len(),
            self.count(false),
            self.count(true),
            self.summary()
        );
    }
}

/// What the API server said of a destination's endpoint around one kernel
/// read (its EndpointSlices and, for an address no longer in them, its pod).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointState {
    /// Ready and not terminating, before and after the read.
    Ready,
    /// Terminating before and after the read (EndpointSlice `terminating:
    /// true`, or its pod gone or with a `deletionTimestamp`), and not one
    /// kube-proxy may use.
    Terminating,
    /// Terminating, but kube-proxy may use it: serving, while its Service has
    /// no ready endpoint on this node. kube-proxy then adds it afresh (at
    /// weight 1), so a weight above 0 is no revival.
    TerminatingInUse,
    /// Anything else: not ready, not an endpoint, or changing during the read.
    Other,
}

/// One destination in one kernel read, with its endpoint as the API server
/// had it then: the input of [`DrainTracker::observe`].
#[derive(Debug, Clone)]
pub struct DestinationSample {
    /// The destination, its Service and its endpoint's pod.
    pub seen: ZeroSeen,
    /// Its weight in the kernel.
    pub weight: u32,
    /// The endpoint's pod uid: from the EndpointSlice, else of the last pod
    /// seen at this address (`None`: none ever was).
    pub uid: Option<String>,
    /// The endpoint's state.
    pub state: EndpointState,
}

/// A destination kube-proxy drained at weight 0 for its terminating
/// endpoint, as the samples showed it.
#[derive(Debug, Clone)]
pub struct Drain {
    /// The first sample at 0, since the sampler started.
    pub at: Duration,
    /// The destination, its Service and pod.
    pub seen: ZeroSeen,
    /// The pod's uid.
    pub uid: String,
    /// Its weight before.
    pub from: u32,
    /// How long at most after its pod started terminating the zero was there:
    /// the time since the last sample in which the API server did not have the
    /// endpoint terminating (give or take the milliseconds the API reads
    /// take); `None` when it was terminating in every sample. Shorter than the
    /// agent's watch lag: the agent could not know of the termination yet.
    pub after_termination: Option<Duration>,
}

/// A drained destination seen above 0 again.
#[derive(Debug, Clone)]
pub struct Revival {
    /// The sample, since the sampler started.
    pub at: Duration,
    /// The destination, its Service and pod.
    pub seen: ZeroSeen,
    /// The pod's uid.
    pub uid: String,
    /// When the drain was first seen.
    pub zeroed_at: Duration,
    /// Its weights in the samples, repeats folded (the last few).
    pub weights: Vec<u32>,
}

/// What [`DrainTracker::observe`] found in one sample.
#[derive(Debug, Clone, Default)]
pub struct DrainEvents {
    /// Destinations drained since the sample before.
    pub drains: Vec<Drain>,
    /// Drained destinations above 0 again (one each time one goes above 0).
    pub revivals: Vec<Revival>,
}

/// How many weights a destination's history keeps.
const HISTORY: usize = 8;

/// The second check, over the [`Sampler`]'s samples (a pure function of them,
/// kept apart from the VM so that it can be tested alone).
///
/// Per destination (virtual service and address), for one pod (its uid):
///
/// - **Drained**: a sample shows it at weight 0 while the API server has its
///   endpoint [`EndpointState::Terminating`] (its pod was deleted; the API
///   server is ahead of kube-proxy and the agent alike, so once it says so the
///   pod never serves again), and an earlier sample showed it above 0 with no
///   sample at 0 while ready since. That excludes zeros the agent wrote
///   itself for a policy before the pod terminated, which it may raise; a
///   zero that came while the endpoint was merely not ready is kube-proxy's
///   drain too, and counts from the first terminating sample.
/// - **Revived** (the violation): a later sample shows the drained
///   destination above 0, for the same pod.
/// - **Afresh**: a sample without the destination (kube-proxy deleted it; one
///   made later is new), another pod at its address (a new pod reusing the IP),
///   or its endpoint [`EndpointState::TerminatingInUse`] (kube-proxy falls
///   back to serving terminating endpoints, deleting and adding them at
///   weight 1) forget what was seen of it.
#[derive(Debug, Default)]
pub struct DrainTracker {
    tracks: HashMap<(VirtualService, SocketAddr), Track>,
}

/// What the samples showed of one destination, for one pod.
#[derive(Debug, Default)]
struct Track {
    uid: Option<String>,
    /// Weights seen, repeats folded, the last [`HISTORY`].
    weights: Vec<u32>,
    /// The last weight above 0 seen (0: none yet).
    last_above_zero: u32,
    /// At 0 in a sample where the endpoint was ready, and not above 0 since.
    zero_while_ready: bool,
    /// The last sample in which the endpoint was not terminating.
    last_not_terminating: Option<Duration>,
    /// Drained: since when, and whether it is above 0 again now.
    drained: Option<(Duration, bool)>,
}

impl DrainTracker {
    /// Take one sample (every destination the kernel showed, `at` since the
    /// sampler started) and say what it drained and revived.
    pub fn observe(&mut self, at: Duration, sample: &[DestinationSample]) -> DrainEvents {
        let mut events = DrainEvents::default();
        let present: std::collections::HashSet<(&VirtualService, SocketAddr)> =
            sample.iter().map(|d| (&d.seen.virtual_service, d.seen.destination)).collect();
        self.tracks.retain(|(vs, dest), _| present.contains(&(vs, *dest)));
        for d in sample {
            let key = (d.seen.virtual_service.clone(), d.seen.destination);
            let track = self.tracks.entry(key).or_insert_with(|| Track { uid: d.uid.clone(), ..Track::default() });
            if d.uid.is_some() && d.uid != track.uid {
                *track = Track { uid: d.uid.clone(), ..Track::default() };
            }
            if track.weights.last() != Some(&d.weight) {
                track.weights.push(d.weight);
                if track.weights.len() > HISTORY {
                    track.weights.remove(0);
                }
            }
            match d.state {
                EndpointState::Terminating => {}
                EndpointState::TerminatingInUse => track.drained = None,
                EndpointState::Ready | EndpointState::Other => track.last_not_terminating = Some(at),
            }
            if d.weight == 0 {
                if d.state == EndpointState::Ready {
                    track.zero_while_ready = true;
                }
                if let Some((_, raised)) = &mut track.drained {
                    *raised = false;
                } else if d.state == EndpointState::Terminating
                    && track.last_above_zero > 0
                    && !track.zero_while_ready
                    && let Some(uid) = &d.uid
                {
                    track.drained = Some((at, false));
                    events.drains.push(Drain {
                        at,
                        seen: d.seen.clone(),
                        uid: uid.clone(),
                        from: track.last_above_zero,
                        after_termination: track.last_not_terminating.map(|t| at.saturating_sub(t)),
                    });
                }
            } else {
                if let Some((zeroed_at, raised)) = &mut track.drained
                    && !*raised
                {
                    *raised = true;
                    events.revivals.push(Revival {
                        at,
                        seen: d.seen.clone(),
                        uid: track.uid.clone().unwrap_or_default(),
                        zeroed_at: *zeroed_at,
                        weights: track.weights.clone(),
                    });
                }
                track.last_above_zero = d.weight;
                track.zero_while_ready = false;
            }
        }
        events
    }
}

/// Reads the kernel every [`SamplerConfig::interval`] on its own thread until
/// [`Sampler::finish`]; see the module's documentation.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    report: Arc<Mutex<SamplerReport>>,
    thread: Option<JoinHandle<()>>,
}

/// An endpoint of a Service, as an EndpointSlice says.
struct EndpointInfo {
    /// `namespace/name`.
    pod: String,
    uid: Option<String>,
    /// Ports (protocol, port) it serves.
    ports: Vec<(String, u16)>,
    /// Ready and not terminating.
    ready: bool,
    serving: bool,
    terminating: bool,
}

/// The Services' virtual services and their endpoints, at one moment.
struct View {
    /// Virtual service → (Service `ns/name`, Service port).
    services: HashMap<VirtualService, (String, u16)>,
    /// (Service `ns/name`, address) → the endpoint (a ready one, when two
    /// slices have the address).
    endpoints: HashMap<(String, IpAddr), EndpointInfo>,
    /// Services with a ready endpoint on this node.
    ready_here: std::collections::HashSet<String>,
}

fn view(handle: &Handle, node: &str, node_addresses: &[IpAddr]) -> View {
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
    let mut endpoints: HashMap<(String, IpAddr), EndpointInfo> = HashMap::new();
    let mut ready_here = std::collections::HashSet::new();
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
            // Absent conditions: ready; serving as ready; not terminating.
            let ready_condition = conditions["ready"] != Value::Bool(false);
            let terminating = conditions["terminating"] == Value::Bool(true);
            let ready = ready_condition && !terminating;
            let serving = conditions["serving"].as_bool().unwrap_or(ready_condition);
            if ready && endpoint["nodeName"].as_str() == Some(node) {
                ready_here.insert(id.clone());
            }
            let pod = format!(
                "{}/{}",
                endpoint["targetRef"]["namespace"].as_str().unwrap_or(namespace),
                endpoint["targetRef"]["name"].as_str().unwrap_or("?")
            );
            let uid = endpoint["targetRef"]["uid"].as_str().map(String::from);
            for address in endpoint["addresses"].as_array().into_iter().flatten() {
                let Some(ip) = address.as_str().and_then(|a| a.parse().ok()) else { continue };
                let key = (id.clone(), ip);
                if endpoints.get(&key).is_some_and(|e| e.ready) {
                    continue;
                }
                let (pod, uid, ports) = (pod.clone(), uid.clone(), ports.clone());
                endpoints.insert(key, EndpointInfo { pod, uid, ports, ready, serving, terminating });
            }
        }
    }
    View { services, endpoints, ready_here }
}

impl View {
    /// The endpoint behind `destination` of `vs`, with its Service.
    fn endpoint(&self, vs: &VirtualService, destination: SocketAddr) -> Option<(&str, u16, &EndpointInfo)> {
        let (service, service_port) = self.services.get(vs)?;
        let endpoint = self.endpoints.get(&(service.clone(), destination.ip()))?;
        endpoint
            .ports
            .iter()
            .any(|(protocol, port)| *protocol == vs.0 && *port == destination.port())
            .then_some((service.as_str(), *service_port, endpoint))
    }

    /// The ready endpoint behind `destination` of `vs`, with its Service.
    fn ready_endpoint(&self, vs: &VirtualService, destination: SocketAddr) -> Option<(&str, u16, &EndpointInfo)> {
        self.endpoint(vs, destination).filter(|(_, _, e)| e.ready)
    }

    /// Whether the endpoint of Service `key.0` at address `key.1` is ready.
    fn is_ready(&self, key: &(String, IpAddr)) -> bool {
        self.endpoints.get(key).is_some_and(|e| e.ready)
    }
}

/// A pod as last seen at an address: `namespace/name` and uid.
type KnownPod = (String, Option<String>);

/// Whether `pod` is terminating or gone: deleted, replaced by another of its
/// name, or with a `deletionTimestamp`.
fn pod_gone(handle: &Handle, (pod, uid): &KnownPod) -> bool {
    let Some((namespace, name)) = pod.split_once('/') else { return false };
    match handle.get("pods", namespace, name) {
        None => true,
        Some(p) => {
            uid.as_deref().is_some_and(|uid| p["metadata"]["uid"].as_str() != Some(uid))
                || !p["metadata"]["deletionTimestamp"].is_null()
        }
    }
}

/// `destination` of `vs` (of Service `service`) in one read, as the API
/// server had its endpoint before and after the read; `known` is the last pod
/// seen at each address.
fn destination_sample(
    handle: &Handle,
    (before, after): (&View, &View),
    known: &HashMap<(String, IpAddr), KnownPod>,
    (vs, service, destination, weight): (&VirtualService, &str, SocketAddr, u32),
) -> DestinationSample {
    let (b, a) = (before.endpoint(vs, destination), after.endpoint(vs, destination));
    let pod: Option<KnownPod> = a
        .or(b)
        .map(|(_, _, e)| (e.pod.clone(), e.uid.clone()))
        .or_else(|| known.get(&(service.to_string(), destination.ip())).cloned());
    let mut gone: Option<bool> = None;
    let mut in_view = |e: Option<&EndpointInfo>, view: &View| -> Option<EndpointState> {
        match e {
            Some(e) if e.ready => Some(EndpointState::Ready),
            Some(e) if e.terminating && e.serving && !view.ready_here.contains(service) => {
                Some(EndpointState::TerminatingInUse)
            }
            Some(e) if e.terminating => Some(EndpointState::Terminating),
            Some(_) => None,
            None => {
                let gone = *gone.get_or_insert_with(|| pod.as_ref().is_some_and(|p| pod_gone(handle, p)));
                gone.then_some(EndpointState::Terminating)
            }
        }
    };
    let (in_before, in_after) = (in_view(b.map(|(_, _, e)| e), before), in_view(a.map(|(_, _, e)| e), after));
    let same_pod = match (b, a) {
        (Some((_, _, b)), Some((_, _, a))) => b.uid == a.uid && b.pod == a.pod,
        _ => true,
    };
    use EndpointState::*;
    let state = match (in_before, in_after) {
        _ if !same_pod => Other,
        (Some(Ready), Some(Ready)) => Ready,
        (Some(TerminatingInUse), Some(Terminating | TerminatingInUse)) | (Some(Terminating), Some(TerminatingInUse)) => {
            TerminatingInUse
        }
        (Some(Terminating), Some(Terminating)) => Terminating,
        _ => Other,
    };
    let (pod, uid) = pod.unwrap_or_else(|| ("?".into(), None));
    DestinationSample {
        seen: ZeroSeen { virtual_service: vs.clone(), destination, service: service.to_string(), pod },
        weight,
        uid,
        state,
    }
}

impl Sampler {
    /// Start sampling `bed`'s node.
    pub fn start(bed: &Testbed, config: SamplerConfig) -> Sampler {
        let client = bed.node.enter(|| IpvsClient::new().expect("IPVS in the node"));
        let handle = bed.handle().clone();
        let node = Node { name: NODE_NAME.into(), addresses: NODE_ADDRESSES.to_vec() };
        let stop = Arc::new(AtomicBool::new(false));
        let report = Arc::new(Mutex::new(SamplerReport::default()));
        let thread = {
            let (stop, report) = (stop.clone(), report.clone());
            std::thread::Builder::new()
                .name("ipvs-sampler".into())
                .spawn(move || sample(client, handle, node, config, &stop, &report))
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

/// The sampled node: its name and addresses.
struct Node {
    name: String,
    addresses: Vec<IpAddr>,
}

fn sample(
    mut client: IpvsClient,
    handle: Handle,
    node: Node,
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
    // (Service, address) → the last pod seen there, and the drains.
    let mut known: HashMap<(String, IpAddr), KnownPod> = HashMap::new();
    let mut drains = DrainTracker::default();
    while !stop.load(Ordering::Relaxed) {
        let tick = Instant::now();
        let before = view(&handle, &node.name, &node.addresses);
        let table = client.dump();
        let read_at = Instant::now();
        let after = view(&handle, &node.name, &node.addresses);
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
        ready_since.retain(|key, _| before.is_ready(key) && after.is_ready(key));
        for key in after.endpoints.keys() {
            if before.is_ready(key) && after.is_ready(key) {
                ready_since.entry(key.clone()).or_insert(read_at);
            }
        }
        let mut candidates = Vec::new();
        let mut destinations = Vec::new();
        for entry in &table {
            let Some(vs) = entry_key(entry) else { continue };
            for dest in &entry.destinations {
                let destination = dest.socket_addr();
                if let Some((service, _)) = after.services.get(&vs) {
                    let seen = (&vs, service.as_str(), destination, dest.weight);
                    destinations.push(destination_sample(&handle, (&before, &after), &known, seen));
                }
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
        for view in [&before, &after] {
            for (key, e) in &view.endpoints {
                known.insert(key.clone(), (e.pod.clone(), e.uid.clone()));
            }
        }
        let at = read_at - started;
        let events = drains.observe(at, &destinations);
        r.drains.extend(events.drains);
        for revival in events.revivals {
            let Revival { seen, uid, zeroed_at, weights, .. } = revival;
            let kind = ViolationKind::DrainRevived { uid, zeroed_at, weights };
            r.violations.push(Violation { at, wall: k8s_openapi::jiff::Timestamp::now().to_string(), seen, kind });
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
                    at,
                    wall: k8s_openapi::jiff::Timestamp::now().to_string(),
                    seen: zero,
                    kind: ViolationKind::ZeroOnReady { ready_for },
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

/// The virtual services in `bed`'s node that the agent would call its own
/// (at an address on `ipvs-op0`, or recorded in the `inet ipvs-operator`
/// nftables table) but that belong to no Service labelled
/// `service.kubernetes.io/service-proxy-name: ipvs-operator`, one line each
/// (empty: none). Without kube-proxy on the node (`kube_proxy` false) every
/// virtual service there is the agent's: one it lost track of (a NodePort at
/// the node's address, recorded nowhere) is found too. Read with `ip`, `nft`
/// and the API objects, not the agent.
pub fn standalone_orphans(bed: &Testbed, kube_proxy: bool) -> Vec<String> {
    let json = |command: &[&str]| -> Value {
        let out = bed.node.exec_output(command);
        if !out.status.success() {
            return Value::Null;
        }
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    };
    let on_interface: Vec<IpAddr> = json(&["ip", "-j", "addr", "show", "dev", "ipvs-op0"])
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|link| link["addr_info"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a["local"].as_str().and_then(|ip| ip.parse().ok()))
        .collect();
    let mut recorded: Vec<VirtualService> = Vec::new();
    for item in json(&["nft", "-j", "list", "table", "inet", "ipvs-operator"])["nftables"].as_array().into_iter().flatten() {
        let set = &item["set"];
        if !set["name"].as_str().is_some_and(|n| n.starts_with("services")) {
            continue;
        }
        for element in set["elem"].as_array().into_iter().flatten() {
            let parts = element["concat"].as_array().cloned().unwrap_or_default();
            let (Some(ip), Some(protocol), Some(port)) = (
                parts.first().and_then(|v| v.as_str()).and_then(|ip| ip.parse::<IpAddr>().ok()),
                parts.get(1).and_then(|v| v.as_str()).map(str::to_uppercase),
                parts.get(2).and_then(|v| v.as_u64()).and_then(|p| u16::try_from(p).ok()),
            ) else {
                continue;
            };
            recorded.push((protocol, SocketAddr::new(ip, port)));
        }
    }
    let mut vips: Vec<VirtualService> = Vec::new();
    let mut node_ports: Vec<(String, u16)> = Vec::new();
    for service in bed.handle().list("services", None) {
        if service["metadata"]["labels"]["service.kubernetes.io/service-proxy-name"].as_str() != Some("ipvs-operator") {
            continue;
        }
        vips.extend(service_virtual_services(&service, &[]).into_iter().map(|(v, _)| v));
        for port in service["spec"]["ports"].as_array().into_iter().flatten() {
            if let Some(node_port) = port["nodePort"].as_u64().and_then(|p| u16::try_from(p).ok()) {
                node_ports.push((port["protocol"].as_str().unwrap_or("TCP").to_string(), node_port));
            }
        }
    }
    let table = bed.ipvs();
    let mut out = Vec::new();
    for key in table.iter().filter_map(entry_key) {
        let (on, is_recorded) = (on_interface.contains(&key.1.ip()), recorded.contains(&key));
        if kube_proxy && !on && !is_recorded {
            continue;
        }
        let served = vips.contains(&key) || node_ports.contains(&(key.0.clone(), key.1.port()));
        if !served {
            let why = match (is_recorded, on) {
                (true, _) => "recorded in its nftables table",
                (false, true) => "at an address on ipvs-op0",
                (false, false) => "no kube-proxy here",
            };
            out.push(format!("{} {}: the agent's ({why}), of no Service it serves", key.0, key.1));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use EndpointState::{Other, Ready, Terminating, TerminatingInUse};

    const VS: &str = "10.96.0.10:80";
    const DEST: &str = "10.244.0.11:8080";

    fn at(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    /// The destination `DEST` of `VS` at `weight`, of pod `web-1` with `uid`.
    fn dest(weight: u32, uid: &str, state: EndpointState) -> DestinationSample {
        DestinationSample {
            seen: ZeroSeen {
                virtual_service: ("TCP".into(), VS.parse().unwrap()),
                destination: DEST.parse().unwrap(),
                service: "default/web".into(),
                pod: "default/web-1".into(),
            },
            weight,
            uid: Some(uid.into()),
            state,
        }
    }

    /// The drains and revivals a tracker found, with the sample index each came in.
    type Found = (Vec<(usize, Drain)>, Vec<(usize, Revival)>);

    /// Feed one destination's samples, 100 ms apart (`None`: a sample without
    /// it); what the tracker found.
    fn run(samples: &[Option<DestinationSample>]) -> Found {
        let mut tracker = DrainTracker::default();
        let (mut drains, mut revivals) = (Vec::new(), Vec::new());
        for (i, s) in samples.iter().enumerate() {
            let events = tracker.observe(at(100 * i as u64), s.as_slice());
            drains.extend(events.drains.into_iter().map(|d| (i, d)));
            revivals.extend(events.revivals.into_iter().map(|r| (i, r)));
        }
        (drains, revivals)
    }

    #[test]
    fn a_drained_terminating_endpoint_raised_again_is_a_revival() {
        let (drains, revivals) = run(&[
            Some(dest(10, "a", Ready)),
            Some(dest(10, "a", Ready)),
            Some(dest(0, "a", Terminating)),
            Some(dest(0, "a", Terminating)),
            Some(dest(10, "a", Terminating)),
            Some(dest(10, "a", Terminating)),
        ]);
        assert_eq!(drains.len(), 1, "{drains:?}");
        let (i, drain) = &drains[0];
        assert_eq!((*i, drain.from, drain.uid.as_str()), (2, 10, "a"));
        assert_eq!(drain.after_termination, Some(at(100)), "terminating since after the sample before");
        assert_eq!(revivals.len(), 1, "one revival while it stays raised: {revivals:?}");
        let (i, revival) = &revivals[0];
        assert_eq!((*i, revival.zeroed_at, revival.weights.clone()), (4, at(200), vec![10, 0, 10]));
    }

    #[test]
    fn raised_zeroed_and_raised_again_is_two_revivals() {
        let (_, revivals) = run(&[
            Some(dest(3, "a", Ready)),
            Some(dest(0, "a", Terminating)),
            Some(dest(3, "a", Terminating)),
            Some(dest(0, "a", Terminating)),
            Some(dest(1, "a", Terminating)),
        ]);
        assert_eq!(revivals.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![2, 4]);
        assert_eq!(revivals[1].1.weights, vec![3, 0, 3, 0, 1]);
    }

    #[test]
    fn a_zero_while_not_ready_then_terminating_counts_from_the_terminating_sample() {
        let (drains, revivals) = run(&[
            Some(dest(10, "a", Ready)),
            Some(dest(0, "a", Other)),
            Some(dest(0, "a", Other)),
            Some(dest(0, "a", Terminating)),
            Some(dest(10, "a", Terminating)),
        ]);
        assert_eq!(drains.iter().map(|(i, d)| (*i, d.after_termination)).collect::<Vec<_>>(), vec![(3, Some(at(100)))]);
        assert_eq!(revivals.len(), 1);
    }

    #[test]
    fn a_zero_the_policy_gave_while_ready_is_not_a_drain() {
        // The agent wrote that 0 itself (the policy's): it may raise it.
        let (drains, revivals) = run(&[
            Some(dest(10, "a", Ready)),
            Some(dest(0, "a", Ready)),
            Some(dest(0, "a", Terminating)),
            Some(dest(5, "a", Terminating)),
        ]);
        assert!(drains.is_empty() && revivals.is_empty(), "{drains:?} {revivals:?}");
    }

    #[test]
    fn never_seen_above_zero_is_not_a_drain() {
        let (drains, revivals) = run(&[Some(dest(0, "a", Terminating)), Some(dest(1, "a", Terminating))]);
        assert!(drains.is_empty() && revivals.is_empty(), "{drains:?} {revivals:?}");
    }

    #[test]
    fn a_destination_deleted_and_made_again_is_new() {
        let (drains, revivals) = run(&[
            Some(dest(10, "a", Ready)),
            Some(dest(0, "a", Terminating)),
            None,
            Some(dest(1, "a", Terminating)),
        ]);
        assert_eq!(drains.len(), 1);
        assert!(revivals.is_empty(), "{revivals:?}");
    }

    #[test]
    fn a_new_pod_at_the_same_address_is_new() {
        // kube-proxy deletes and adds the destination in one sync: no sample
        // without it, but another pod (uid) behind it.
        let (drains, revivals) = run(&[
            Some(dest(10, "a", Ready)),
            Some(dest(0, "a", Terminating)),
            Some(dest(1, "b", Ready)),
            Some(dest(10, "b", Ready)),
        ]);
        assert_eq!(drains.len(), 1);
        assert!(revivals.is_empty(), "{revivals:?}");
    }

    #[test]
    fn kube_proxy_falling_back_to_a_terminating_endpoint_is_no_revival() {
        // The last ready endpoint went: kube-proxy adds the serving terminating
        // one afresh at weight 1; when it drains it again, that is a new drain.
        let (drains, revivals) = run(&[
            Some(dest(10, "a", Ready)),
            Some(dest(0, "a", Terminating)),
            Some(dest(1, "a", TerminatingInUse)),
            Some(dest(0, "a", Terminating)),
            Some(dest(1, "a", Terminating)),
        ]);
        assert_eq!(drains.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![1, 3]);
        assert_eq!(revivals.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![4]);
    }

    #[test]
    fn destinations_are_tracked_apart() {
        let mut other = dest(10, "c", Ready);
        other.seen.destination = "10.244.0.12:8080".parse().unwrap();
        let mut tracker = DrainTracker::default();
        tracker.observe(at(0), &[dest(10, "a", Ready), other.clone()]);
        let events = tracker.observe(at(100), &[dest(0, "a", Terminating), other.clone()]);
        assert_eq!(events.drains.len(), 1);
        other.weight = 20;
        let events = tracker.observe(at(200), &[dest(0, "a", Terminating), other]);
        assert!(events.revivals.is_empty(), "{:?}", events.revivals);
    }

    #[test]
    fn a_violation_names_the_destination_the_pod_and_the_weights() {
        let v = Violation {
            at: at(2500),
            wall: "2026-01-01T00:00:00Z".into(),
            seen: dest(10, "a", Terminating).seen,
            kind: ViolationKind::DrainRevived { uid: "a".into(), zeroed_at: at(1200), weights: vec![10, 0, 10] },
        };
        let text = v.describe();
        for part in [VS, DEST, "default/web-1", "uid a", "at weight 10 again", "+1.2s", "10 → 0 → 10"] {
            assert!(text.contains(part), "{part:?} not in {text:?}");
        }
        let report = SamplerReport { samples: 1, violations: vec![v], ..SamplerReport::default() };
        let panicked = std::panic::catch_unwind(|| report.assert_clean()).expect_err("a revival fails the check");
        let message = panicked.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(message.contains("1 destinations drained for a terminating endpoint were raised again"), "{message}");
    }
}
