//! A Kubernetes **test API server**: a test double, not a Kubernetes API server.
//!
//! A real HTTP server (HTTP/1.1, no TLS, no authentication) that speaks the
//! Kubernetes REST protocol for the kinds in [`resources::KINDS`] well enough
//! that kube-rs's `Api`, `watcher`, `reflector`, `metadata_watcher` and
//! `Controller`, and kubectl, run against it unmodified. For kubectl that
//! includes the OpenAPI v3 documents it reads before writing (`openapi`), so
//! that it validates on the server as by default (`fieldValidation=Strict`,
//! honoured for unknown fields: `validation`), and `meta.k8s.io/v1` Tables for
//! `kubectl get` with a CRD's printer columns (`table`). Events are one
//! resource in two schemas, `v1` and `events.k8s.io/v1` (`events`). It also
//! emulates the cluster around the API: Service IP allocation, Deployments and
//! DaemonSets expanded into Pods, a scheduler and kubelet giving pods nodes,
//! IPs and a Ready condition, the EndpointSlice controller (dual-stack, with
//! topology hints), garbage collection, a CRD's deletion taking its objects with it, and the namespace
//! controller ([`Config::namespace_cleanup`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use ipvs_operator_tests::apiserver::{Config, TestApiServer};
//! let server = TestApiServer::start(Config::default()).await?;
//! let client = server.client()?;               // a kube::Client for it
//! server.handle().load_manifests("apiVersion: v1\nkind: Namespace\nmetadata: {name: demo}\n")?;
//! server.handle().close_watches();              // a fault: every watch ends now
//! server.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! Standalone: `test-apiserver --listen 127.0.0.1:6443 --load manifests.yaml`,
//! with the same controls over HTTP under `/_test/` (see [`admin`]).

pub mod admin;
mod controllers;
pub mod error;
mod events;
mod http;
mod loader;
mod openapi;
pub mod patch;
pub mod resources;
pub mod traffic;
mod schema;
pub mod selector;
mod service_validation;
mod ssa;
mod store;
mod table;
mod validation;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use controllers::{
    ANNOTATION_POD_IP, ANNOTATION_POD_IPS, ANNOTATION_POD_NODES, ANNOTATION_PREFIX, ANNOTATION_READY,
    ANNOTATION_TOPOLOGY_MODE, LABEL_MANAGED_BY, LABEL_SERVICE_NAME, LABEL_ZONE,
};
pub use error::{ApiError, Error, FieldError, FieldErrorKind, Result};
pub use store::Grace;

use store::{Key, Store};

/// The operator's CustomResourceDefinitions, as `make crd` generates them:
/// deploy/crd.yaml, several YAML documents (WeightedService, PodInfoSlice);
/// [`operator_crds`] gives them one by one.
pub const OPERATOR_CRD: &str = include_str!("../../../deploy/crd.yaml");

/// The operator's CustomResourceDefinitions ([`OPERATOR_CRD`]), each its own
/// YAML document, in the file's order.
pub fn operator_crds() -> Vec<String> {
    yaml_documents(OPERATOR_CRD)
}

/// The documents of a multi-document YAML text, split on lines that are
/// exactly `---` (as `ipvs-operator crd` separates them); empty ones dropped.
pub fn yaml_documents(yaml: &str) -> Vec<String> {
    let mut docs = vec![String::new()];
    for line in yaml.split_inclusive('\n') {
        if line.trim_end_matches(['\r', '\n']) == "---" {
            docs.push(String::new());
        } else if let Some(doc) = docs.last_mut() {
            doc.push_str(line);
        }
    }
    docs.retain(|d| !d.trim().is_empty());
    docs
}

/// An IPv4 range, `a.b.c.d/n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// The network address as a number.
    pub base: u32,
    /// Prefix length.
    pub prefix: u8,
}

impl Cidr {
    /// How many addresses the range holds.
    pub fn size(&self) -> u32 {
        if self.prefix == 0 { u32::MAX } else { 1u32 << (32 - u32::from(self.prefix.min(32))) }
    }

    /// Whether `ip` is in the range.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = if self.prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(self.prefix.min(32))) };
        u32::from(ip) & mask == self.base
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.base), self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let (ip, len) = s.split_once('/').ok_or_else(|| Error::Cidr(s.to_string()))?;
        let ip: Ipv4Addr = ip.parse().map_err(|_| Error::Cidr(s.to_string()))?;
        let prefix: u8 = len.parse().ok().filter(|p| *p <= 32).ok_or_else(|| Error::Cidr(s.to_string()))?;
        let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix)) };
        Ok(Self { base: u32::from(ip) & mask, prefix })
    }
}

/// An IPv6 range, `a:b::/n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr6 {
    /// The network address as a number.
    pub base: u128,
    /// Prefix length.
    pub prefix: u8,
}

impl Cidr6 {
    fn mask(prefix: u8) -> u128 {
        if prefix == 0 { 0 } else { u128::MAX << (128 - u32::from(prefix.min(128))) }
    }

    /// How many addresses the range holds (`u128::MAX` for `::/0`).
    pub fn size(&self) -> u128 {
        if self.prefix == 0 { u128::MAX } else { 1u128 << (128 - u32::from(self.prefix.min(128))) }
    }

    /// Whether `ip` is in the range.
    pub fn contains(&self, ip: Ipv6Addr) -> bool {
        u128::from(ip) & Self::mask(self.prefix) == self.base
    }
}

impl std::fmt::Display for Cidr6 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", Ipv6Addr::from(self.base), self.prefix)
    }
}

impl FromStr for Cidr6 {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let (ip, len) = s.split_once('/').ok_or_else(|| Error::Cidr(s.to_string()))?;
        let ip: Ipv6Addr = ip.parse().map_err(|_| Error::Cidr(s.to_string()))?;
        let prefix: u8 = len.parse().ok().filter(|p| *p <= 128).ok_or_else(|| Error::Cidr(s.to_string()))?;
        Ok(Self { base: u128::from(ip) & Self::mask(prefix), prefix })
    }
}

/// A Node the server starts with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeConfig {
    /// `metadata.name`.
    pub name: String,
    /// Its `InternalIP` address (pods with hostNetwork get it; NodePorts live on it).
    pub address: IpAddr,
    /// Extra labels (e.g. `topology.kubernetes.io/zone`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl NodeConfig {
    /// A node named `name` at `address`, without extra labels.
    pub fn new(name: impl Into<String>, address: IpAddr) -> Self {
        Self { name: name.into(), address, labels: BTreeMap::new() }
    }

    /// The same node in zone `zone` (its [`LABEL_ZONE`] label), which its
    /// pods' endpoints carry and topology hints name.
    pub fn with_zone(mut self, zone: impl Into<String>) -> Self {
        self.labels.insert(LABEL_ZONE.to_string(), zone.into());
        self
    }

    /// Its zone, if it has one.
    pub fn zone(&self) -> Option<&str> {
        self.labels.get(LABEL_ZONE).map(String::as_str)
    }
}

/// How the server and its emulated cluster behave.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where pod IPs come from (default `10.244.0.0/16`).
    pub pod_cidr: Cidr,
    /// Where ClusterIPs come from (default `10.96.0.0/12`).
    pub service_cidr: Cidr,
    /// Where pods' IPv6 addresses come from (default `fd00:10:244::/64`):
    /// with it every pod gets a second, IPv6 entry in `status.podIPs`, as on
    /// a dual-stack cluster: its IPv4 address's number within this range
    /// (`fd00:10:244::a01:50a` for `10.1.5.10`). `None` gives IPv4 only.
    pub pod_cidr_v6: Option<Cidr6>,
    /// Where IPv6 ClusterIPs come from (default `fd00:10:96::/112`). With it
    /// the cluster is dual-stack with IPv4 primary (as a cluster whose
    /// `--service-cluster-ip-range` lists the IPv4 range first): Services
    /// asking for `PreferDualStack` or `RequireDualStack` get both families.
    /// `None` makes the cluster IPv4 single-stack: `RequireDualStack` and
    /// `IPv6` are refused, as a real single-stack cluster refuses them.
    pub service_cidr_v6: Option<Cidr6>,
    /// Where node ports come from (default 30000–32767).
    pub node_port_range: RangeInclusive<u16>,
    /// Nodes that exist from the start (default: `node-1` at 192.0.2.1).
    pub nodes: Vec<NodeConfig>,
    /// Namespaces that exist from the start.
    pub namespaces: Vec<String>,
    /// How long a deleted pod stays terminating when the delete names no grace
    /// period (default 1 s; a real kubelet takes up to the pod's 30 s).
    pub pod_grace: Grace,
    /// How often a watch that asked for bookmarks gets one (real: ~1 min).
    pub bookmark_interval: Duration,
    /// How many events the log keeps; a watch from before them gets 410.
    pub max_events: usize,
    /// How long a deleted namespace stays `Terminating` before the emulated
    /// namespace controller deletes what is in it and then the namespace
    /// (default: no time, it goes with the DELETE; a real one takes seconds,
    /// during which its objects can still be read and deleted, not created —
    /// `kubectl delete -k` relies on that).
    pub namespace_cleanup: Duration,
    /// The version `/version` reports.
    pub version: (u32, u32),
    /// CustomResourceDefinitions (YAML, a string may hold several documents)
    /// stored at start, as on a cluster where they are installed (default:
    /// the operator's, from deploy/crd.yaml: [`operator_crds`]). Custom
    /// resources are pruned, defaulted and validated against their stored
    /// CRD; a test that installs the CRDs itself (as `kubectl apply -k
    /// deploy/` does) starts with none.
    pub crds: Vec<String>,
    /// How many endpoints an EndpointSlice holds at most (default 100, the
    /// real controller's `--max-endpoints-per-slice`).
    pub max_endpoints_per_slice: usize,
    /// How long after a pod or Service change the EndpointSlice controller
    /// writes the Service's slices (default 50 ms; see `controllers.rs`).
    /// `Duration::ZERO` writes them with the change, under the same lock.
    pub endpoint_slice_delay: Duration,
    /// Seeds the server's random choices (generated names, the order of
    /// EndpointSlice writes, the delays of [`WatchLag`]); `None` picks one
    /// from the time. The
    /// `IPVS_TEST_SEED` environment variable overrides it. The seed used is
    /// logged and printed to stderr (`test-apiserver seed: N`) at start.
    pub seed: Option<u64>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            pod_cidr: Cidr { base: u32::from(Ipv4Addr::new(10, 244, 0, 0)), prefix: 16 },
            service_cidr: Cidr { base: u32::from(Ipv4Addr::new(10, 96, 0, 0)), prefix: 12 },
            // fd00:10:244::/64 and fd00:10:96::/112
            pod_cidr_v6: Some(Cidr6 { base: 0xfd00_0010_0244_0000 << 64, prefix: 64 }),
            service_cidr_v6: Some(Cidr6 { base: 0xfd00_0010_0096_0000 << 64, prefix: 112 }),
            node_port_range: 30000..=32767,
            nodes: vec![NodeConfig {
                name: "node-1".into(),
                address: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
                labels: BTreeMap::new(),
            }],
            namespaces: ["default", "kube-system", "kube-public", "kube-node-lease"].map(String::from).to_vec(),
            pod_grace: Grace::For(Duration::from_secs(1)),
            bookmark_interval: Duration::from_secs(5),
            max_events: 10_000,
            namespace_cleanup: Duration::ZERO,
            version: (1, 37),
            crds: operator_crds(),
            max_endpoints_per_slice: 100,
            endpoint_slice_delay: Duration::from_millis(50),
            seed: None,
        }
    }
}

/// A change a test makes to a pod. Unset fields stay as they are.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodUpdate {
    /// A new address of one family: it replaces the pod's address of that
    /// family in `status.podIPs` (or joins them: IPv4 first), and
    /// `status.podIP` is the first of them.
    #[serde(default)]
    pub ip: Option<IpAddr>,
    /// New `status.podIPs`, all of them (`status.podIP` is the first); applied before `ip`.
    #[serde(default)]
    pub ips: Option<Vec<IpAddr>>,
    /// New `spec.nodeName` (and hostIP).
    #[serde(default)]
    pub node: Option<String>,
    /// Ready condition (its `lastTransitionTime` moves only when its status does, as a kubelet writes it).
    #[serde(default)]
    pub ready: Option<bool>,
    /// The pod's containers restarted: each `containerStatuses[].restartCount`
    /// goes up by one (a status write that changes neither readiness nor labels).
    #[serde(default)]
    pub restarted: bool,
    /// New labels (replacing all).
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
}

/// One request the server answered, in RBAC terms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// RBAC verb: get, list, watch, create, update, patch, delete, deletecollection.
    pub verb: String,
    /// API group ("" for core).
    pub group: String,
    /// API version.
    pub version: String,
    /// Resource plural; empty for a non-resource URL (discovery, `/version`).
    pub resource: String,
    /// Subresource, e.g. `status`.
    pub subresource: String,
    /// Namespace; empty for cluster-scoped or all-namespace requests.
    pub namespace: String,
    /// Object name; empty for collections.
    pub name: String,
    /// The URL path.
    pub path: String,
    /// The client's User-Agent.
    pub user_agent: String,
    /// The HTTP status answered.
    pub code: u16,
}

/// A rule that makes matching requests fail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailRule {
    /// How many more requests it fails.
    pub count: u32,
    /// The HTTP status (500, 503, 429, …); the body is the matching `Status`.
    pub code: u16,
    /// Only requests for this resource plural (e.g. `pods`).
    #[serde(default)]
    pub resource: Option<String>,
    /// Only requests with this RBAC verb (e.g. `watch`).
    #[serde(default)]
    pub verb: Option<String>,
}

#[derive(Debug, Default)]
pub(crate) struct Faults {
    pub rules: Vec<FailRule>,
    pub delay: Option<Duration>,
}

/// Which watches lag, and by how much: see [`Handle::lag_watches`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchLag {
    /// Watches whose client's User-Agent starts with this (`""`: every watch).
    pub user_agent_prefix: String,
    /// The least delay of an event.
    pub min: Duration,
    /// The greatest delay of an event (a `max` below `min` counts as `min`).
    pub max: Duration,
}

/// The lag fault and its own random numbers (splitmix64 state).
#[derive(Debug)]
pub(crate) struct LagState {
    lag: Option<WatchLag>,
    rng: u64,
}

impl LagState {
    fn new(seed: u64) -> Self {
        // Apart from the other generators, so that lagging shifts no other choice.
        Self { lag: None, rng: seed ^ 0x001a_66ed_3a7c }
    }

    /// The delay of an event produced now for a client with `user_agent`.
    fn delay_for(&mut self, user_agent: &str) -> Duration {
        let Some(lag) = &self.lag else { return Duration::ZERO };
        if !user_agent.starts_with(&lag.user_agent_prefix) {
            return Duration::ZERO;
        }
        let (min, max) = (lag.min, lag.max.max(lag.min));
        let span = (max - min).as_nanos();
        if span == 0 {
            return min;
        }
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let r = u128::from(controllers::mix(self.rng)) % (span + 1);
        min + Duration::from_nanos(u64::try_from(r).unwrap_or(u64::MAX))
    }
}

/// How [`Handle::close_watches`] ends streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseMode {
    /// The response ends cleanly (the last chunk is sent).
    Clean,
    /// The connection is cut mid-stream.
    Abort,
}

pub(crate) struct Shared {
    pub store: Mutex<Store>,
    pub faults: Mutex<Faults>,
    pub lag: Mutex<LagState>,
    pub record: Mutex<Vec<RequestRecord>>,
    pub traffic: Mutex<traffic::TrafficLog>,
    pub changed: tokio::sync::watch::Receiver<u64>,
    pub closer: tokio::sync::watch::Sender<(u64, CloseMode)>,
    pub url: String,
    pub bookmark_interval: Duration,
    pub version: (u32, u32),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves consistent-enough state for a test double.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    /// How long an event a watch of `user_agent` produces now waits before it is sent.
    pub(crate) fn watch_delay(&self, user_agent: &str) -> Duration {
        lock(&self.lag).delay_for(user_agent)
    }
}

/// Controls a running server in-process: load manifests, change pods, inject
/// faults, read the request record. Cheap to clone.
#[derive(Clone)]
pub struct Handle(pub(crate) Arc<Shared>);

impl Handle {
    pub(crate) fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.0.store)
    }

    /// The server's base URL, e.g. `http://127.0.0.1:41234`.
    pub fn url(&self) -> &str {
        &self.0.url
    }

    /// The current resourceVersion (the global revision).
    pub fn resource_version(&self) -> u64 {
        self.store().rv
    }

    /// Creates or updates every object in a multi-document YAML manifest (as a
    /// server-side apply by manager `test-apiserver-load`), creating missing
    /// namespaces; `status` stanzas are applied too. Returns `(kind, namespace, name)`
    /// of each object.
    pub fn load_manifests(&self, yaml: &str) -> Result<Vec<(String, String, String)>> {
        let mut st = self.store();
        let out = loader::load(&mut st, yaml);
        st.reconcile();
        out
    }

    /// [`load_manifests`](Self::load_manifests) from a file.
    pub fn load_file(&self, path: &std::path::Path) -> Result<Vec<(String, String, String)>> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| Error::Io { context: format!("reading {}", path.display()), source })?;
        self.load_manifests(&text)
    }

    /// Reads an object by resource plural (e.g. `pods`, `endpointslices`).
    pub fn get(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        let kind = resources::find_by_plural(resource)?;
        self.store().get(kind, namespace, name).ok()
    }

    /// Lists objects of a resource plural, in one namespace or all (`None`).
    pub fn list(&self, resource: &str, namespace: Option<&str>) -> Vec<Value> {
        let Some(kind) = resources::find_by_plural(resource) else { return Vec::new() };
        let st = self.store();
        st.objects[kind].iter().filter(|(k, _)| namespace.is_none_or(|n| k.0 == n)).map(|(_, v)| v.clone()).collect()
    }

    /// Adds or replaces a Node.
    pub fn add_node(&self, node: &NodeConfig) -> Result<Value> {
        Ok(self.store().add_node(node)?)
    }

    /// Changes a pod's IP, node, readiness or labels; EndpointSlices follow
    /// [`Config::endpoint_slice_delay`] later.
    pub fn update_pod(&self, namespace: &str, name: &str, update: &PodUpdate) -> Result<Value> {
        Ok(self.store().update_pod(namespace, name, update)?)
    }

    /// Marks a pod Ready or not.
    pub fn set_pod_ready(&self, namespace: &str, name: &str, ready: bool) -> Result<Value> {
        self.update_pod(namespace, name, &PodUpdate { ready: Some(ready), ..Default::default() })
    }

    /// Replaces a pod's labels.
    pub fn set_pod_labels(&self, namespace: &str, name: &str, labels: BTreeMap<String, String>) -> Result<Value> {
        self.update_pod(namespace, name, &PodUpdate { labels: Some(labels), ..Default::default() })
    }

    /// Sets (`Some`) or removes (`None`) one label of a pod, keeping the others.
    pub fn set_pod_label(&self, namespace: &str, name: &str, key: &str, value: Option<&str>) -> Result<Value> {
        let mut st = self.store();
        let pod = st.get(resources::ids::pods(), namespace, name)?;
        let mut labels: BTreeMap<String, String> =
            serde_json::from_value(pod.pointer("/metadata/labels").cloned().unwrap_or(Value::Null)).unwrap_or_default();
        match value {
            Some(v) => labels.insert(key.to_string(), v.to_string()),
            None => labels.remove(key),
        };
        Ok(st.update_pod(namespace, name, &PodUpdate { labels: Some(labels), ..Default::default() })?)
    }

    /// Deletes a pod as a kubelet would see it: terminating for `grace`, then gone.
    pub fn delete_pod(&self, namespace: &str, name: &str, grace: Grace) -> Result<Value> {
        let mut st = self.store();
        let r = st.delete(
            resources::ids::pods(),
            namespace,
            name,
            store::DeleteOptions { grace: Some(grace), ..Default::default() },
        );
        st.reconcile();
        Ok(r?)
    }

    /// Ends a terminating pod's grace period now (the kubelet confirms it stopped).
    pub fn finish_pod_termination(&self, namespace: &str, name: &str) -> Result<()> {
        let mut st = self.store();
        let r = st.finish_pod(&(namespace.to_string(), name.to_string()) as &Key, None);
        st.reconcile();
        Ok(r?)
    }

    /// Ends every open watch now, cleanly (clients see the stream end and resume).
    pub fn close_watches(&self) {
        self.0.closer.send_modify(|(n, m)| {
            *n += 1;
            *m = CloseMode::Clean;
        });
    }

    /// Cuts every open watch's connection mid-stream (clients see an error).
    pub fn break_watches(&self) {
        self.0.closer.send_modify(|(n, m)| {
            *n += 1;
            *m = CloseMode::Abort;
        });
    }

    /// Answers the next `count` requests with `code` (500, 503, 429, …).
    pub fn fail_next(&self, count: u32, code: u16) {
        self.add_fail_rule(FailRule { count, code, resource: None, verb: None });
    }

    /// Adds a failure rule (optionally for one resource and verb).
    pub fn add_fail_rule(&self, rule: FailRule) {
        lock(&self.0.faults).rules.push(rule);
    }

    /// Drops every failure rule not used up yet (a burst ends now).
    pub fn clear_fail_rules(&self) {
        lock(&self.0.faults).rules.clear();
    }

    /// Delays every answer by `delay` (`None` stops).
    pub fn set_delay(&self, delay: Option<Duration>) {
        lock(&self.0.faults).delay = delay;
    }

    /// Delay every watch event sent to clients whose User-Agent starts with
    /// `user_agent_prefix` by a random time in `min..=max` (from the server's
    /// seeded RNG), never reordering a stream's events: an event goes out at
    /// the later of the time the one before it went out and the time it was
    /// produced plus its delay. Bookmarks, the initial events of a watch and
    /// its errors are events too; the end of a stream waits for its events.
    /// Already-open watches lag from their next event on; `None` stops lagging
    /// (events already waiting keep their time). GET and LIST answers are not
    /// delayed: a fresh read shows the current state, as a real server's does
    /// while a client's watch falls behind.
    pub fn lag_watches(&self, lag: Option<WatchLag>) {
        lock(&self.0.lag).lag = lag;
    }

    /// Makes every resourceVersion issued so far too old: the next watch from
    /// any of them gets `410 Gone`. Open watches go on; combine with
    /// [`close_watches`](Self::close_watches) to force relists.
    pub fn expire_resource_versions(&self) {
        self.store().expire();
    }

    /// Every request answered so far, oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.0.record).clone()
    }

    /// Forgets the recorded requests.
    pub fn clear_requests(&self) {
        lock(&self.0.record).clear();
    }

    /// What the server sent each client (by User-Agent) of each resource since
    /// it started or [`reset_traffic`](Self::reset_traffic) was last called.
    pub fn traffic(&self) -> traffic::TrafficLog {
        lock(&self.0.traffic).clone()
    }

    /// Starts the traffic log afresh.
    pub fn reset_traffic(&self) {
        lock(&self.0.traffic).clear();
    }

    /// Adds to the traffic log of `user_agent` and `resource`.
    pub(crate) fn count_traffic(&self, user_agent: &str, resource: &str, add: impl FnOnce(&mut traffic::Traffic)) {
        let mut log = lock(&self.0.traffic);
        match log.get_mut(&(user_agent.to_string(), resource.to_string())) {
            Some(t) => add(t),
            None => add(log.entry((user_agent.to_string(), resource.to_string())).or_default()),
        }
    }
}

/// A running test API server. Dropping it stops it.
pub struct TestApiServer {
    handle: Handle,
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestApiServer {
    /// Starts a server on `127.0.0.1:0` (an ephemeral port).
    pub async fn start(config: Config) -> Result<Self> {
        Self::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), config).await
    }

    /// Starts a server on `addr`.
    pub async fn start_on(addr: SocketAddr, mut config: Config) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Io { context: format!("binding {addr}"), source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| Error::Io { context: "reading the bound address".into(), source })?;
        let (changed_tx, changed_rx) = tokio::sync::watch::channel(0u64);
        let (closer, _) = tokio::sync::watch::channel((0u64, CloseMode::Clean));
        let seed = controllers::resolve_seed(config.seed);
        config.seed = Some(seed);
        tracing::info!(seed, "test API server seed (IPVS_TEST_SEED={seed} replays it)");
        eprintln!("test-apiserver seed: {seed}");
        let bookmark_interval = config.bookmark_interval;
        let version = config.version;
        let host = if addr.ip().is_unspecified() { IpAddr::V4(Ipv4Addr::LOCALHOST) } else { addr.ip() };
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new(config, changed_tx)),
            faults: Mutex::new(Faults::default()),
            lag: Mutex::new(LagState::new(seed)),
            record: Mutex::new(Vec::new()),
            traffic: Mutex::new(traffic::TrafficLog::new()),
            changed: changed_rx,
            closer,
            url: format!("http://{}", SocketAddr::new(host, addr.port())),
            bookmark_interval,
            version,
        });
        let handle = Handle(shared);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(http::serve(listener, handle.clone(), rx));
        tracing::info!(%addr, "test API server listening");
        Ok(Self { handle, addr, shutdown: Some(tx), task: Some(task) })
    }

    /// The base URL, e.g. `http://127.0.0.1:41234`.
    pub fn url(&self) -> &str {
        self.handle.url()
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The control handle.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// A kube client for this server (default namespace `default`).
    pub fn client(&self) -> Result<kube::Client> {
        client_for(self.url())
    }

    /// A kube client for this server that sends `user_agent` as its
    /// User-Agent (kube-rs sends none of its own), e.g. to be the client a
    /// [`WatchLag`] picks.
    pub fn client_as(&self, user_agent: &str) -> Result<kube::Client> {
        client_with_user_agent(self.url(), Some(user_agent))
    }

    /// Stops accepting, ends every connection and waits for the server task.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for TestApiServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A kube client for a server at `url` (plain HTTP, default namespace `default`).
pub fn client_for(url: &str) -> Result<kube::Client> {
    client_with_user_agent(url, None)
}

/// [`client_for`], sending `user_agent` as the User-Agent if given.
pub fn client_with_user_agent(url: &str, user_agent: Option<&str>) -> Result<kube::Client> {
    let uri: ::http::Uri = url.parse().map_err(|_| Error::Url(url.to_string()))?;
    let plain = uri.scheme_str() == Some("http");
    let mut config = kube::Config::new(uri);
    if plain {
        // No TLS is spoken over http://, but kube's rustls connector still loads
        // the system's CA store, which the test VM does not have: an explicit
        // (empty) CA list skips that.
        config.root_cert = Some(Vec::new());
    }
    if let Some(agent) = user_agent {
        let value = agent.parse().map_err(|_| Error::UserAgent(agent.to_string()))?;
        config.headers.push((::http::header::USER_AGENT, value));
    }
    Ok(kube::Client::try_from(config)?)
}

/// A kubeconfig that points at `url`, for kubectl and in-cluster-less binaries.
pub fn kubeconfig_yaml(url: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {url}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: test\n    namespace: default\ncurrent-context: test\nusers:\n- name: test\n  user: {{}}\n"
    )
}
