//! The cluster's built-in behaviour, emulated: Service IP and node-port
//! allocation, a ReplicaSet-like Deployment controller, a DaemonSet
//! controller, a scheduler plus kubelet that gives pods a node, an IP and a
//! Ready condition, and the EndpointSlice controller.
//!
//! The EndpointSlice controller is as untidy as the real one, so that clients
//! meet what they meet on a cluster:
//! - A Service's endpoints are split into slices of at most
//!   [`Config::max_endpoints_per_slice`](super::Config) (default 100) per
//!   resolved port list, placed as the real reconciler places them: an
//!   endpoint that stays keeps its slice, new ones go into slices being
//!   written anyway, then into the unchanged slice that they fill best, and a
//!   slice is created only when none has room; nothing is rebalanced, a slice
//!   left empty is deleted (one empty placeholder stays for a Service without
//!   endpoints), and one left over is reused before a new one is created.
//! - It is asynchronous: a pod or Service change marks its namespace's slices
//!   to be synced [`Config::endpoint_slice_delay`](super::Config) later
//!   (default 50 ms), from the server's timer task, each slice its own write
//!   (own resourceVersion, own watch event) after the pod's. Further changes
//!   before then join that sync, as a real controller's work queue batches
//!   them. 50 ms is about what a real controller takes on an idle cluster
//!   (a watch event, its queue, a write), long enough that a client has
//!   handled the pod's event before the slices change (the moment where they
//!   disagree is real and testable), and short enough that the suite's
//!   hundreds of pod changes cost it little. Timers fire on a 10 ms tick, so a
//!   sync lands 50–60 ms after the change. `Duration::ZERO` syncs with the
//!   change, under the same lock, as this emulation used to.
//! - It writes out of order: the writes of one Service's sync are shuffled,
//!   and half the time (at random) only some of them are made, the rest a
//!   delay later, so an endpoint may leave one slice before it appears in
//!   another, or appear before it leaves. The choices come from a seeded RNG:
//!   the `IPVS_TEST_SEED` environment variable if set (for every server the
//!   process starts), else [`Config::seed`](super::Config), else the time.
//!   The seed is logged at start and printed to stderr as
//!   `test-apiserver seed: N`: `IPVS_TEST_SEED=N` replays a failing test's
//!   choices (as far as its timing allows; the seed also seeds generated
//!   names and uids).
//!
//! - It is dual-stack as the real one: a Service gets one set of slices per
//!   family in its `ipFamilies` (`addressType` `IPv4`, `IPv6`), each
//!   endpoint's addresses its pod's `status.podIPs` of that family (a pod
//!   without one is left out of that family's slices); slices of a family the
//!   Service no longer has are deleted. Each family is planned as above, with
//!   its own placeholder.
//! - It writes topology hints as the real one (`trafficdist`): under
//!   `spec.trafficDistribution` `PreferClose` or `PreferSameZone` every ready
//!   endpoint with a zone gets `hints.forZones` naming its zone, under
//!   `PreferSameNode` also `hints.forNodes` naming its node; without one (or
//!   when the topology annotation is set) hints are removed. The annotation
//!   `service.kubernetes.io/topology-mode: Auto` gives zone hints when the
//!   real allocator would give any (every ready endpoint has a zone, the
//!   ready nodes span at least two zones, at least as many ready endpoints as
//!   zones), else none; see [`auto_hints`] for how the allocation is
//!   simplified. A change of the Service's `trafficDistribution` or
//!   annotations, or of a node's zone, rewrites the hints.
//!
//! The kubelet gives a pod an IPv4 address (`Config::pod_cidr`) and, when
//! `Config::pod_cidr_v6` is set, an IPv6 one after it in `status.podIPs`
//! (the IPv4 address's number within the IPv6 range), unless its manifest
//! gave `status.podIPs` (kept as given) or its [`ANNOTATION_POD_IP`] names
//! several addresses.
//!
//! Simplifications (listed in tests/README.md): Deployments own their
//! Pods directly (no ReplicaSet objects), a template change replaces all pods
//! at once. Nodes have one address (hostNetwork pods get it alone).
//! DaemonSets place one pod on every node whose labels
//! match the template's `nodeSelector` (taints, tolerations and affinity are
//! not looked at), and replace all of them at once when the template changes.
//! The EndpointSlice controller syncs a namespace's Services together, and
//! its slices are not rewritten when a client edits them.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde_json::{Value, json};

use super::error::ApiError;
use super::resources::{KINDS, ids};
use super::service_validation::{IPV4, IPV6, family_of, strings};
use super::store::{DeleteOptions, Store, Sub, now};

/// Annotation prefix the emulation reads.
pub const ANNOTATION_PREFIX: &str = "test-apiserver.codesink.net/";
/// On a Pod: the IP the emulated kubelet gives it, or its IPs,
/// comma-separated (`status.podIPs` in that order). A single IPv4 address is
/// joined by an IPv6 one from `Config::pod_cidr_v6` when that is set (its
/// number within that range); a single IPv6 address stays alone (an
/// IPv6-only pod).
pub const ANNOTATION_POD_IP: &str = "test-apiserver.codesink.net/pod-ip";
/// The label of a Node naming its zone, which its pods' endpoints carry.
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";
/// The Service annotation that asks for topology-aware hints (`Auto`).
pub const ANNOTATION_TOPOLOGY_MODE: &str = "service.kubernetes.io/topology-mode";
/// Its deprecated predecessor, which wins when both are set.
const ANNOTATION_TOPOLOGY_AWARE_HINTS: &str = "service.kubernetes.io/topology-aware-hints";
/// On a Pod: `"false"` makes it start unready.
pub const ANNOTATION_READY: &str = "test-apiserver.codesink.net/ready";
/// On a Deployment: comma-separated IPs its pods take, in order.
pub const ANNOTATION_POD_IPS: &str = "test-apiserver.codesink.net/pod-ips";
/// On a Deployment: comma-separated node names, matched to `pod-ips` by position.
pub const ANNOTATION_POD_NODES: &str = "test-apiserver.codesink.net/pod-nodes";
/// The label EndpointSlices carry to name their Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// The label naming the controller that manages an EndpointSlice.
pub const LABEL_MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
const MANAGED_BY: &str = "endpointslice-controller.k8s.io";

/// `v.pointer(ptr)`, without allocating: `Value::pointer` unescapes every
/// token into a new string, and the controllers look up a few paths of every
/// object of a namespace whenever it changes.
fn pointer<'a>(v: &'a Value, ptr: &str) -> Option<&'a Value> {
    if ptr.is_empty() || ptr.contains('~') {
        return v.pointer(ptr);
    }
    ptr.strip_prefix('/')?.split('/').try_fold(v, |cur, token| match cur {
        Value::Object(map) => map.get(token),
        Value::Array(items) => items.get(token.parse::<usize>().ok()?),
        _ => None,
    })
}

fn s<'a>(v: &'a Value, ptr: &str) -> Option<&'a str> {
    pointer(v, ptr).and_then(Value::as_str)
}

fn annotation<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    pointer(v, "/metadata/annotations").and_then(|a| a.get(key)).and_then(Value::as_str)
}

fn owner_ref(owner: &Value, controller: bool) -> Value {
    json!({
        "apiVersion": owner["apiVersion"], "kind": owner["kind"],
        "name": owner["metadata"]["name"], "uid": owner["metadata"]["uid"],
        "controller": controller, "blockOwnerDeletion": true,
    })
}

fn owned_by(obj: &Value, uid: &str) -> bool {
    pointer(obj, "/metadata/ownerReferences")
        .and_then(Value::as_array)
        .is_some_and(|r| r.iter().any(|o| o.get("uid").and_then(Value::as_str) == Some(uid)))
}

fn terminating(obj: &Value) -> bool {
    pointer(obj, "/metadata/deletionTimestamp").is_some()
}

fn pod_ready(pod: &Value) -> bool {
    pointer(pod, "/status/conditions").and_then(Value::as_array).is_some_and(|cs| {
        cs.iter().any(|c| c.get("type").and_then(Value::as_str) == Some("Ready") && c.get("status").and_then(Value::as_str) == Some("True"))
    })
}

/// A pod's addresses: `status.podIPs`, else `status.podIP`.
fn pod_ips(pod: &Value) -> Vec<&str> {
    let ips: Vec<&str> = pointer(pod, "/status/podIPs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|e| e.get("ip").and_then(Value::as_str))
        .collect();
    if ips.is_empty() { s(pod, "/status/podIP").into_iter().collect() } else { ips }
}

/// `status.podIP` and `status.podIPs` for `ips` (the first is `podIP`).
fn set_pod_ips(status: &mut Value, ips: &[String]) {
    match ips.first() {
        Some(first) => status["podIP"] = json!(first),
        None => {
            if let Some(m) = status.as_object_mut() {
                m.remove("podIP");
            }
        }
    }
    status["podIPs"] = Value::Array(ips.iter().map(|ip| json!({"ip": ip})).collect());
}

/// Whether a selector map matches an object's labels.
fn selector_matches(selector: &serde_json::Map<String, Value>, obj: &Value) -> bool {
    let labels = pointer(obj, "/metadata/labels");
    selector.iter().all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

/// A stable short hash of a JSON value, as `pod-template-hash` labels look.
fn template_hash(v: &Value) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in v.to_string().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..10)
        .map(|_| {
            let c = ALPHABET[(h % ALPHABET.len() as u64) as usize] as char;
            h /= ALPHABET.len() as u64;
            c
        })
        .collect()
}

/// The environment variable whose seed, if set, every server of the process uses.
pub const SEED_ENV: &str = "IPVS_TEST_SEED";

/// The seed a server uses: `IPVS_TEST_SEED` if set (and a number), else the
/// configured one, else one from the time.
pub(crate) fn resolve_seed(configured: Option<u64>) -> u64 {
    if let Ok(v) = std::env::var(SEED_ENV) {
        match v.trim().parse::<u64>() {
            Ok(seed) => return seed,
            Err(_) => tracing::warn!(value = %v, "{SEED_ENV} is not a u64: ignored"),
        }
    }
    configured.unwrap_or_else(time_seed)
}

/// A seed from the time (and the process's hasher keys).
fn time_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    // Small enough to type back in, large enough not to repeat.
    h.finish() % 1_000_000_000_000
}

/// splitmix64: spreads a seed (or a counter) over all 64 bits.
pub(crate) fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The store's name and uid generator's start from a seed (non-zero, as
/// xorshift needs).
pub(crate) fn name_seed(seed: u64) -> u64 {
    mix(seed) | 1
}

/// The EndpointSlice controller's own state.
pub(crate) struct SliceSync {
    /// Namespaces whose Services' slices are synced at the instant given.
    pending: BTreeMap<String, tokio::time::Instant>,
    /// Its random choices (write order, split syncs): splitmix64 state.
    rng: u64,
}

impl SliceSync {
    /// Seeded with `seed` (a server resolved it with [`resolve_seed`]), else from the time.
    pub(crate) fn new(seed: Option<u64>) -> Self {
        // Apart from the names' generator, so that names do not shift the order.
        Self { pending: BTreeMap::new(), rng: mix(seed.unwrap_or_else(time_seed) ^ 0x5eed_511c_e5) }
    }

    /// Whether a sync is waiting.
    pub(crate) fn is_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    fn random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.rng)
    }

    /// A random number below `n` (> 0).
    fn below(&mut self, n: usize) -> usize {
        (self.random() % n as u64) as usize
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }
}

/// A write of the EndpointSlice controller.
#[derive(Debug)]
enum SliceWrite {
    /// Replace the slice of that name.
    Update(String, Value),
    /// Create a slice (generated name).
    Create(Value),
    /// Remove the slice of that name.
    Remove(String),
}

/// What identifies an endpoint across syncs (as the real controller's
/// endpoint hash): its addresses and the pod it stands for.
fn endpoint_key(ep: &Value) -> (String, String) {
    let addresses = ep.get("addresses").map(Value::to_string).unwrap_or_default();
    let pod = pointer(ep, "/targetRef/namespace").and_then(Value::as_str).unwrap_or_default().to_string() + "/"
        + pointer(ep, "/targetRef/name").and_then(Value::as_str).unwrap_or_default();
    (addresses, pod)
}

fn endpoints_of(slice: &Value) -> &[Value] {
    slice.get("endpoints").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default()
}

/// The address types a Service's slices have: one per family of its
/// `ipFamilies`. Without them (written by an older server) the real
/// controller takes the family of the ClusterIP, and both for a headless
/// Service.
fn address_types(svc: &Value) -> Vec<&'static str> {
    let mut types: Vec<&'static str> = Vec::new();
    for f in pointer(svc, "/spec/ipFamilies").and_then(Value::as_array).into_iter().flatten() {
        let t = match f.as_str() {
            Some(IPV4) => IPV4,
            Some(IPV6) => IPV6,
            _ => continue,
        };
        if !types.contains(&t) {
            types.push(t);
        }
    }
    if !types.is_empty() {
        return types;
    }
    match s(svc, "/spec/clusterIP").and_then(family_of) {
        Some(f) => vec![f],
        None => vec![IPV4, IPV6],
    }
}

/// Which hints a Service's endpoints get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hints {
    /// None: any left are removed.
    None,
    /// `trafficDistribution: PreferClose` or `PreferSameZone`, and with
    /// `nodes` `PreferSameNode`: each ready endpoint its own zone (and node).
    Close { nodes: bool },
    /// The topology annotation set to `Auto`: see [`auto_hints`].
    Auto,
}

/// The hints `svc` asks for, as the real reconciler decides: the topology
/// annotation (the deprecated one first) set to `Auto` wins over
/// `trafficDistribution`.
fn hint_mode(svc: &Value) -> Hints {
    let annotations = pointer(svc, "/metadata/annotations");
    let mode = [ANNOTATION_TOPOLOGY_AWARE_HINTS, ANNOTATION_TOPOLOGY_MODE]
        .iter()
        .find_map(|a| annotations.and_then(|m| m.get(*a)))
        .and_then(Value::as_str);
    if matches!(mode, Some("Auto" | "auto")) {
        return Hints::Auto;
    }
    match s(svc, "/spec/trafficDistribution") {
        Some("PreferClose" | "PreferSameZone") => Hints::Close { nodes: false },
        Some("PreferSameNode") => Hints::Close { nodes: true },
        _ => Hints::None,
    }
}

fn endpoint_ready(ep: &Value) -> bool {
    pointer(ep, "/conditions/ready").and_then(Value::as_bool) == Some(true)
}

/// Whether the topology cache gives the `ready` endpoints of one address
/// type hints, with the ready nodes in `zones` (`None`: a node without a
/// zone). It refuses as the real one does when a node has no zone, the nodes
/// are all in one zone, there are fewer ready endpoints than zones, or a
/// ready endpoint has no zone. Simplified: the real one then allocates
/// endpoints to zones in proportion to the zones' allocatable CPU (and
/// refuses when that would overload an endpoint by more than 20%), moving
/// hints from zones with more endpoints than their share to zones with
/// fewer; here every endpoint keeps its own zone, which is what the real
/// allocation gives when the endpoints are spread over the zones as the
/// CPU is (and our Nodes report no CPU).
fn auto_hints(ready: &[&Value], zones: &Option<BTreeSet<String>>) -> bool {
    let Some(zones) = zones else { return false };
    zones.len() >= 2
        && ready.len() >= zones.len()
        && ready.iter().all(|ep| ep.get("zone").and_then(Value::as_str).is_some_and(|z| !z.is_empty()))
}

/// The unchanged slice (index in `slices`, with its endpoint count) that
/// `n` more endpoints fill best without overfilling it (the real
/// controller's `getSliceToFill`).
fn slice_to_fill(slices: &[(&Value, usize)], n: usize, max: usize) -> Option<usize> {
    let mut best: Option<(usize, usize)> = None;
    for (i, (_, len)) in slices.iter().enumerate() {
        let Some(room) = max.checked_sub(n + len) else { continue };
        if best.is_none_or(|(_, b)| room < b) {
            best = Some((i, room));
            if room == 0 {
                break;
            }
        }
    }
    best.map(|(i, _)| i)
}

/// The writes that make the slices `managed` of Service `svc` (named `name`)
/// of one address type hold the endpoint `groups` (resolved port list,
/// endpoints in order), at most `max` endpoints a slice, as the real
/// reconciler (`reconcileByPortMapping`, then `finalize`) plans them.
fn plan_slices(
    svc: &Value,
    name: &str,
    address_type: &str,
    groups: Vec<(Value, Vec<Value>)>,
    managed: &[&Value],
    max: usize,
) -> Vec<SliceWrite> {
    let max = max.max(1);
    let mut labels = pointer(svc, "/metadata/labels").and_then(Value::as_object).cloned().unwrap_or_default();
    labels.insert(LABEL_SERVICE_NAME.into(), json!(name));
    labels.insert(LABEL_MANAGED_BY.into(), json!(MANAGED_BY));
    let labels = Value::Object(labels);
    let no_ports = json!([]);
    let ports_are = |sl: &Value, ports: &Value| sl.get("ports").filter(|p| !p.is_null()).unwrap_or(&no_ports) == ports;
    // (slice, ports, endpoints) to write over it; (ports, endpoints) to create; slices to delete.
    let mut updates: Vec<(&Value, Value, Vec<Value>)> = Vec::new();
    let mut creates: Vec<(Value, Vec<Value>)> = Vec::new();
    let mut deletes: Vec<&Value> = managed.iter().copied().filter(|sl| !groups.iter().any(|(p, _)| ports_are(sl, p))).collect();
    for (ports, endpoints) in groups {
        let index: HashMap<(String, String), usize> = endpoints.iter().enumerate().map(|(i, e)| (endpoint_key(e), i)).collect();
        let mut desired: Vec<Option<Value>> = endpoints.into_iter().map(Some).collect();
        let mut updated: Vec<(&Value, Vec<Value>)> = Vec::new();
        let mut unchanged: Vec<(&Value, usize)> = Vec::new();
        // 1. Endpoints that stay keep their slice; a slice left empty goes.
        for &sl in managed.iter().filter(|sl| ports_are(sl, &ports)) {
            let old = endpoints_of(sl);
            let mut kept = Vec::new();
            let mut changed = false;
            for e in old {
                match index.get(&endpoint_key(e)).and_then(|&i| desired[i].take()) {
                    Some(d) => {
                        changed |= d != *e;
                        kept.push(d);
                    }
                    None => changed = true,
                }
            }
            if changed {
                if kept.is_empty() { deletes.push(sl) } else { updated.push((sl, kept)) }
            } else if pointer(sl, "/metadata/labels") != Some(&labels) {
                updated.push((sl, kept));
            } else {
                unchanged.push((sl, kept.len()));
            }
        }
        let mut left: VecDeque<Value> = desired.into_iter().flatten().collect();
        // 2. New endpoints go into the slices written anyway, fullest first.
        updated.sort_by_key(|(_, eps)| std::cmp::Reverse(eps.len()));
        for (_, eps) in &mut updated {
            while eps.len() < max
                && let Some(e) = left.pop_front()
            {
                eps.push(e);
            }
        }
        // 3. The rest into the unchanged slice they fill best, else new slices.
        while !left.is_empty() {
            let fill = if left.len() < max { slice_to_fill(&unchanged, left.len(), max) } else { None };
            let (target, mut eps) = match fill {
                Some(i) => {
                    let (sl, _) = unchanged.remove(i);
                    (Some(sl), endpoints_of(sl).to_vec())
                }
                None => (None, Vec::new()),
            };
            while eps.len() < max
                && let Some(e) = left.pop_front()
            {
                eps.push(e);
            }
            match target {
                Some(sl) => updated.push((sl, eps)),
                None => creates.push((ports.clone(), eps)),
            }
        }
        updates.extend(updated.into_iter().map(|(sl, eps)| (sl, ports.clone(), eps)));
    }
    // A Service without endpoints keeps one empty placeholder slice.
    if deletes.len() == managed.len() && creates.is_empty() {
        let placeholder = |sl: &Value| ports_are(sl, &no_ports) && endpoints_of(sl).is_empty();
        if deletes.len() == 1 && placeholder(deletes[0]) {
            let sl = deletes.remove(0);
            if pointer(sl, "/metadata/labels") != Some(&labels) {
                updates.push((sl, no_ports.clone(), Vec::new()));
            }
        } else {
            creates.push((no_ports.clone(), Vec::new()));
        }
    }
    // A slice to delete is reused for one to create (fewer writes, as `finalize`).
    while !deletes.is_empty()
        && let Some((ports, eps)) = creates.pop()
    {
        updates.push((deletes.remove(0), ports, eps));
    }
    let mut writes = Vec::new();
    for (ports, eps) in creates {
        writes.push(SliceWrite::Create(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"generateName": format!("{name}-"), "labels": labels, "ownerReferences": [owner_ref(svc, true)]},
            "addressType": address_type, "ports": ports, "endpoints": eps,
        })));
    }
    for (sl, ports, eps) in updates {
        let eps = Value::Array(eps);
        if sl.get("ports") == Some(&ports) && sl.get("endpoints") == Some(&eps) && pointer(sl, "/metadata/labels") == Some(&labels) {
            continue;
        }
        let mut next = sl.clone();
        next["ports"] = ports;
        next["endpoints"] = eps;
        next["metadata"]["labels"] = labels.clone();
        writes.push(SliceWrite::Update(s(sl, "/metadata/name").unwrap_or_default().to_string(), next));
    }
    writes.extend(deletes.iter().filter_map(|sl| s(sl, "/metadata/name")).map(|n| SliceWrite::Remove(n.to_string())));
    writes
}

impl Store {
    /// Runs the built-in controllers until nothing changes (bounded).
    pub fn reconcile(&mut self) {
        self.collect_orphans();
        for _ in 0..16 {
            if self.dirty.is_empty() && !self.nodes_changed {
                return;
            }
            let mut namespaces = std::mem::take(&mut self.dirty);
            if std::mem::take(&mut self.nodes_changed) {
                // Node changes affect scheduling and endpoint zones everywhere.
                namespaces.extend(self.objects[ids::pods()].keys().map(|k| k.0.clone()));
                namespaces.extend(self.objects[ids::daemonsets()].keys().map(|k| k.0.clone()));
            }
            for ns in namespaces {
                self.reconcile_namespace(&ns);
            }
        }
        tracing::warn!("built-in controllers did not settle after 16 rounds");
    }

    fn reconcile_namespace(&mut self, ns: &str) {
        self.reconcile_deployments(ns);
        self.reconcile_daemonsets(ns);
        self.run_kubelet(ns);
        self.schedule_endpoint_slices(ns);
        self.reconcile_namespace_deletion(ns);
    }

    fn in_ns(&self, kind: usize, ns: &str) -> Vec<Value> {
        self.iter_ns(kind, ns).cloned().collect()
    }

    /// The objects of a kind in a namespace, borrowed: the controllers run
    /// after every write to a namespace, and copying all its pods each time
    /// made that cost more than the write.
    fn iter_ns<'a>(&'a self, kind: usize, ns: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        let lo = (ns.to_string(), String::new());
        self.objects[kind].range(lo..).take_while(move |(k, _)| k.0 == ns).map(|(_, v)| v)
    }

    fn reconcile_namespace_deletion(&mut self, ns: &str) {
        let key = (String::new(), ns.to_string());
        let Some(n) = self.objects[ids::namespaces()].get(&key) else { return };
        if !terminating(n) || n.pointer("/spec/finalizers").and_then(Value::as_array).is_some_and(|f| !f.is_empty()) {
            return;
        }
        let empty = (0..KINDS.len()).all(|k| !KINDS[k].namespaced || self.in_ns(k, ns).is_empty());
        if empty {
            self.remove(ids::namespaces(), &key);
        }
    }

    // ---- Services ----

    /// Defaults a Service and allocates its ClusterIP and node ports; a later
    /// write that omits them keeps the allocated ones.
    pub(crate) fn prepare_service(&mut self, svc: &mut Value, old: Option<&Value>) -> Result<(), ApiError> {
        if !svc.get("spec").is_some_and(Value::is_object) {
            svc["spec"] = json!({});
        }
        let spec = &mut svc["spec"];
        let typ = spec.get("type").and_then(Value::as_str).unwrap_or("ClusterIP").to_string();
        spec["type"] = json!(typ);
        if spec.get("sessionAffinity").is_none() {
            spec["sessionAffinity"] = json!("None");
        }
        if let Some(Value::Array(ports)) = spec.get_mut("ports") {
            for p in ports.iter_mut() {
                if p.get("protocol").is_none() {
                    p["protocol"] = json!("TCP");
                }
                if p.get("targetPort").is_none()
                    && let Some(port) = p.get("port").cloned()
                {
                    p["targetPort"] = port;
                }
            }
        }
        if typ == "ExternalName" {
            return Ok(());
        }
        if spec.get("internalTrafficPolicy").is_none() {
            spec["internalTrafficPolicy"] = json!("Cluster");
        }
        // Validation settled the families (`service_validation::init_families`)
        // and kept the addresses a write left out: each family without an
        // address gets one, as the allocator does on create, on an upgrade to
        // dual-stack, and on a change from ExternalName.
        let mut ips = strings(spec.get("clusterIPs"));
        let mut families = strings(spec.get("ipFamilies"));
        if families.is_empty() {
            families.push(IPV4.to_string());
        }
        if ips.first().is_some_and(|ip| ip == "None") {
            ips.truncate(1);
        } else {
            ips.truncate(families.len());
            for family in families.iter().skip(ips.len()) {
                let ip = self.allocate_service_ip(family == IPV6)?;
                ips.push(ip);
            }
        }
        let spec = &mut svc["spec"];
        spec["clusterIP"] = json!(ips.first().cloned().unwrap_or_default());
        spec["clusterIPs"] = json!(ips);
        if spec.get("ipFamilies").is_none() {
            spec["ipFamilies"] = json!(families);
        }
        if spec.get("ipFamilyPolicy").is_none() {
            spec["ipFamilyPolicy"] = json!("SingleStack");
        }
        if typ == "NodePort" || typ == "LoadBalancer" {
            if spec.get("externalTrafficPolicy").is_none() {
                spec["externalTrafficPolicy"] = json!("Cluster");
            }
            let old_ports: Vec<Value> = old.and_then(|o| o.pointer("/spec/ports")).and_then(Value::as_array).cloned().unwrap_or_default();
            let mut in_use: BTreeSet<u16> = self.node_ports_in_use();
            for p in &old_ports {
                if let Some(n) = p.get("nodePort").and_then(Value::as_u64) {
                    in_use.remove(&(n as u16));
                }
            }
            let n_ports = svc["spec"]["ports"].as_array().map(Vec::len).unwrap_or(0);
            for i in 0..n_ports {
                let p = svc["spec"]["ports"][i].clone();
                if p.get("nodePort").and_then(Value::as_u64).is_some_and(|n| n > 0) {
                    continue;
                }
                let same = old_ports.iter().find(|o| o.get("port") == p.get("port") && o.get("protocol") == p.get("protocol"));
                let np = match same.and_then(|o| o.get("nodePort")).and_then(Value::as_u64) {
                    Some(n) => n as u16,
                    None => self.allocate_node_port(&in_use)?,
                };
                in_use.insert(np);
                svc["spec"]["ports"][i]["nodePort"] = json!(np);
            }
        } else if let Some(Value::Array(ports)) = svc["spec"].get_mut("ports") {
            for p in ports {
                if let Some(m) = p.as_object_mut() {
                    m.remove("nodePort");
                }
            }
        }
        Ok(())
    }

    fn node_ports_in_use(&self) -> BTreeSet<u16> {
        self.objects[ids::services()]
            .values()
            .filter_map(|s| s.pointer("/spec/ports").and_then(Value::as_array))
            .flatten()
            .filter_map(|p| p.get("nodePort").and_then(Value::as_u64))
            .map(|n| n as u16)
            .collect()
    }

    fn allocate_node_port(&mut self, in_use: &BTreeSet<u16>) -> Result<u16, ApiError> {
        let range = self.cfg.node_port_range.clone();
        let span = u32::from(*range.end() - *range.start()) + 1;
        for _ in 0..span {
            let p = self.next_node_port;
            self.next_node_port = if p >= *range.end() { *range.start() } else { p + 1 };
            if !in_use.contains(&p) {
                return Ok(p);
            }
        }
        Err(ApiError::injected(500).with_message("range of node ports is full"))
    }

    /// A free ClusterIP of the IPv4 range, or of the IPv6 one (`v6`).
    fn allocate_service_ip(&mut self, v6: bool) -> Result<String, ApiError> {
        let used: BTreeSet<IpAddr> = self.objects[ids::services()]
            .values()
            .filter_map(|s| s.pointer("/spec/clusterIPs").and_then(Value::as_array))
            .flatten()
            .filter_map(|ip| ip.as_str()?.parse().ok())
            .collect();
        if v6 {
            let Some(cidr) = self.cfg.service_cidr_v6 else {
                return Err(ApiError::injected(500).with_message("no IPv6 range of service IPs"));
            };
            // As for IPv4: the first ten addresses are left out.
            let size = cidr.size().saturating_sub(11).clamp(1, u128::from(u32::MAX));
            for _ in 0..size {
                let off = 10 + u128::from(self.next_service_ip6) % size;
                self.next_service_ip6 = self.next_service_ip6.wrapping_add(1);
                let ip = IpAddr::V6(Ipv6Addr::from(cidr.base.wrapping_add(off)));
                if !used.contains(&ip) {
                    return Ok(ip.to_string());
                }
            }
            return Err(ApiError::injected(500).with_message("range of service IPs is full"));
        }
        let cidr = self.cfg.service_cidr;
        // .0 is the network, .1 is the `kubernetes` Service's by convention.
        let size = cidr.size().saturating_sub(2);
        for _ in 0..size {
            let off = 10 + self.next_service_ip % size.saturating_sub(9).max(1);
            self.next_service_ip = self.next_service_ip.wrapping_add(1);
            let ip = IpAddr::V4(Ipv4Addr::from(cidr.base + off));
            if !used.contains(&ip) {
                return Ok(ip.to_string());
            }
        }
        Err(ApiError::injected(500).with_message("range of service IPs is full"))
    }

    fn allocate_pod_ip(&mut self) -> String {
        let cidr = self.cfg.pod_cidr;
        let size = cidr.size().saturating_sub(11).max(1);
        for _ in 0..size {
            let off = 10 + self.next_pod_ip % size;
            self.next_pod_ip = self.next_pod_ip.wrapping_add(1);
            let ip = Ipv4Addr::from(cidr.base + off).to_string();
            if self.pod_placement.pods_with_ip(&ip) == 0 {
                return ip;
            }
        }
        // A full pod range in a test is a test bug; reuse rather than fail.
        Ipv4Addr::from(cidr.base + 10).to_string()
    }

    /// The IPv6 address of a pod whose IPv4 address is `v4` (`None`: no
    /// IPv6 pod range): the IPv4 address's number within the IPv6 range
    /// (`fd00:10:244::a01:50a` for `10.1.5.10`), unique as the IPv4 addresses
    /// are (in a range of at least 2^32 addresses), and found without
    /// looking at the other pods, of which a scale test has tens of thousands.
    fn pod_ip6_for(&self, v4: Ipv4Addr) -> Option<String> {
        let cidr = self.cfg.pod_cidr_v6?;
        let off = u128::from(u32::from(v4)) % cidr.size().max(1);
        Some(Ipv6Addr::from(cidr.base.wrapping_add(off)).to_string())
    }

    // ---- Deployments ----

    fn reconcile_deployments(&mut self, ns: &str) {
        let deployments = self.in_ns(ids::deployments(), ns);
        if deployments.is_empty() {
            return;
        }
        for d in deployments {
            let Some(uid) = s(&d, "/metadata/uid").map(str::to_string) else { continue };
            let name = s(&d, "/metadata/name").unwrap_or_default().to_string();
            if terminating(&d) {
                continue;
            }
            // A pod relabeled out of the selector is released (its owner
            // reference removed) and replaced, as a ReplicaSet does.
            let selector = d.pointer("/spec/selector/matchLabels").and_then(Value::as_object).cloned().unwrap_or_default();
            // Only the pods to release are copied: this runs at every write
            // to the namespace, and copying all its pods cost more than the write.
            let released: Vec<Value> = self
                .iter_ns(ids::pods(), ns)
                .filter(|p| owned_by(p, &uid) && !selector_matches(&selector, p))
                .cloned()
                .collect();
            for p in released {
                let mut next = p.clone();
                if let Some(Value::Array(refs)) = next.pointer_mut("/metadata/ownerReferences") {
                    refs.retain(|r| r.get("uid").and_then(Value::as_str) != Some(uid.as_str()));
                }
                let pname = s(&p, "/metadata/name").unwrap_or_default().to_string();
                if let Err(e) = self.update(ids::pods(), ns, &pname, next, Sub::Main) {
                    tracing::debug!(error = %e, "deployment controller: releasing a pod");
                }
            }
            let mine: Vec<&Value> =
                self.iter_ns(ids::pods(), ns).filter(|p| owned_by(p, &uid) && selector_matches(&selector, p)).collect();
            let template = d.pointer("/spec/template").cloned().unwrap_or_else(|| json!({}));
            let hash = template_hash(&template);
            let replicas = d.pointer("/spec/replicas").and_then(Value::as_u64).unwrap_or(1) as usize;
            let live: Vec<&&Value> = mine.iter().filter(|p| !terminating(p)).collect();
            let (current, stale): (Vec<&&Value>, Vec<&&Value>) =
                live.iter().partition(|p| s(p, "/metadata/labels/pod-template-hash") == Some(hash.as_str()));
            let mut doomed: Vec<String> =
                stale.iter().filter_map(|p| s(p, "/metadata/name")).map(str::to_string).collect();
            let current_count = current.len();
            if current_count > replicas {
                let mut extra: Vec<&&&Value> = current.iter().collect();
                extra.sort_by_key(|p| std::cmp::Reverse(s(p, "/metadata/creationTimestamp").unwrap_or_default().to_string()));
                doomed.extend(extra.iter().take(current_count - replicas).filter_map(|p| s(p, "/metadata/name")).map(str::to_string));
            }
            for pod in doomed {
                if let Err(e) = self.delete(ids::pods(), ns, &pod, DeleteOptions::default()) {
                    tracing::debug!(error = %e, "deployment controller: deleting a pod");
                }
            }
            for _ in current_count..replicas {
                let mut pod = json!({
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": template.get("metadata").cloned().unwrap_or_else(|| json!({})),
                    "spec": template.get("spec").cloned().unwrap_or_else(|| json!({})),
                });
                let m = &mut pod["metadata"];
                m["generateName"] = json!(format!("{name}-{hash}-"));
                if !m.get("labels").is_some_and(Value::is_object) {
                    m["labels"] = json!({});
                }
                m["labels"]["pod-template-hash"] = json!(hash);
                m["ownerReferences"] = json!([owner_ref(&d, true)]);
                if let Some(m) = pod["metadata"].as_object_mut() {
                    m.remove("name");
                }
                if let Err(e) = self.create(ids::pods(), ns, pod) {
                    tracing::warn!(error = %e, deployment = %name, "deployment controller: creating a pod");
                }
            }
            self.update_deployment_status(ns, &name, &uid, &hash);
        }
    }

    fn update_deployment_status(&mut self, ns: &str, name: &str, uid: &str, hash: &str) {
        let pods: Vec<&Value> = self.iter_ns(ids::pods(), ns).filter(|p| owned_by(p, uid) && !terminating(p)).collect();
        let Ok(d) = self.get(ids::deployments(), ns, name) else { return };
        let ready = pods.iter().filter(|p| pod_ready(p)).count();
        let updated = pods.iter().filter(|p| s(p, "/metadata/labels/pod-template-hash") == Some(hash)).count();
        let status = json!({
            "observedGeneration": d["metadata"]["generation"],
            "replicas": pods.len(), "updatedReplicas": updated,
            "readyReplicas": ready, "availableReplicas": ready,
        });
        if d.get("status") == Some(&status) {
            return;
        }
        let mut next = d.clone();
        next["status"] = status;
        if let Err(e) = self.update(ids::deployments(), ns, name, next, Sub::Status) {
            tracing::debug!(error = %e, "deployment status");
        }
    }

    // ---- DaemonSets ----

    fn reconcile_daemonsets(&mut self, ns: &str) {
        let daemonsets = self.in_ns(ids::daemonsets(), ns);
        if daemonsets.is_empty() {
            return;
        }
        let nodes: Vec<Value> = self.objects[ids::nodes()].values().cloned().collect();
        for ds in daemonsets {
            let Some(uid) = s(&ds, "/metadata/uid").map(str::to_string) else { continue };
            let name = s(&ds, "/metadata/name").unwrap_or_default().to_string();
            if terminating(&ds) {
                continue;
            }
            let template = ds.pointer("/spec/template").cloned().unwrap_or_else(|| json!({}));
            let hash = template_hash(&template);
            let node_selector = template.pointer("/spec/nodeSelector").and_then(Value::as_object).cloned().unwrap_or_default();
            let wanted: BTreeSet<String> = nodes
                .iter()
                .filter(|n| selector_matches(&node_selector, n))
                .filter_map(|n| s(n, "/metadata/name"))
                .map(str::to_string)
                .collect();
            let pods: Vec<Value> = self.in_ns(ids::pods(), ns).into_iter().filter(|p| owned_by(p, &uid) && !terminating(p)).collect();
            let mut covered = BTreeSet::new();
            let mut doomed = Vec::new();
            for p in &pods {
                let node = s(p, "/spec/nodeName").unwrap_or_default();
                let current = s(p, "/metadata/labels/controller-revision-hash") == Some(hash.as_str());
                if current && wanted.contains(node) && covered.insert(node.to_string()) {
                    continue;
                }
                doomed.extend(s(p, "/metadata/name").map(str::to_string));
            }
            for pod in doomed {
                if let Err(e) = self.delete(ids::pods(), ns, &pod, DeleteOptions::default()) {
                    tracing::debug!(error = %e, "daemonset controller: deleting a pod");
                }
            }
            for node in wanted.difference(&covered) {
                let mut pod = json!({
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": template.get("metadata").cloned().unwrap_or_else(|| json!({})),
                    "spec": template.get("spec").cloned().unwrap_or_else(|| json!({})),
                });
                let m = &mut pod["metadata"];
                m["generateName"] = json!(format!("{name}-"));
                if !m.get("labels").is_some_and(Value::is_object) {
                    m["labels"] = json!({});
                }
                m["labels"]["controller-revision-hash"] = json!(hash);
                m["labels"]["pod-template-generation"] = json!(ds["metadata"]["generation"].as_i64().unwrap_or(1).to_string());
                m["ownerReferences"] = json!([owner_ref(&ds, true)]);
                if let Some(m) = pod["metadata"].as_object_mut() {
                    m.remove("name");
                }
                pod["spec"]["nodeName"] = json!(node);
                if let Err(e) = self.create(ids::pods(), ns, pod) {
                    tracing::warn!(error = %e, daemonset = %name, "daemonset controller: creating a pod");
                }
            }
            self.update_daemonset_status(ns, &name, &uid, &hash, &wanted);
        }
    }

    fn update_daemonset_status(&mut self, ns: &str, name: &str, uid: &str, hash: &str, wanted: &BTreeSet<String>) {
        let pods: Vec<Value> = self.in_ns(ids::pods(), ns).into_iter().filter(|p| owned_by(p, uid) && !terminating(p)).collect();
        let Ok(ds) = self.get(ids::daemonsets(), ns, name) else { return };
        let on_wanted: Vec<&Value> = pods.iter().filter(|p| s(p, "/spec/nodeName").is_some_and(|n| wanted.contains(n))).collect();
        let nodes_with = |f: &dyn Fn(&Value) -> bool| {
            on_wanted.iter().filter(|p| f(p)).filter_map(|p| s(p, "/spec/nodeName")).collect::<BTreeSet<_>>().len()
        };
        let current = nodes_with(&|_| true);
        let ready = nodes_with(&|p| pod_ready(p));
        let updated = nodes_with(&|p| s(p, "/metadata/labels/controller-revision-hash") == Some(hash));
        let misscheduled = pods.iter().filter(|p| !s(p, "/spec/nodeName").is_some_and(|n| wanted.contains(n))).count();
        let status = json!({
            "observedGeneration": ds["metadata"]["generation"],
            "desiredNumberScheduled": wanted.len(), "currentNumberScheduled": current,
            "numberMisscheduled": misscheduled, "numberReady": ready, "numberAvailable": ready,
            "numberUnavailable": wanted.len().saturating_sub(ready), "updatedNumberScheduled": updated,
        });
        if ds.get("status") == Some(&status) {
            return;
        }
        let mut next = ds.clone();
        next["status"] = status;
        if let Err(e) = self.update(ids::daemonsets(), ns, name, next, Sub::Status) {
            tracing::debug!(error = %e, "daemonset status");
        }
    }

    // ---- scheduler and kubelet ----

    fn run_kubelet(&mut self, ns: &str) {
        // Only pods still to start: the others are not copied.
        let starting: Vec<Value> = self
            .iter_ns(ids::pods(), ns)
            .filter(|pod| !terminating(pod) && s(pod, "/status/podIP").is_none())
            .filter(|pod| s(pod, "/status/phase").is_none_or(|p| p == "Pending"))
            .cloned()
            .collect();
        for pod in starting {
            let name = s(&pod, "/metadata/name").unwrap_or_default().to_string();
            let owner = self.owning_deployment(&pod);
            let (ip, node) = self.place_pod(&pod, owner.as_ref());
            let Some(node) = node else {
                continue; // No node to run on: stays Pending, as with a real scheduler.
            };
            let host_ip = self.node_ip(&node).unwrap_or_default();
            // Addresses a manifest gave (`status.podIPs` without `podIP`) stay.
            let given: Vec<String> = pod_ips(&pod).into_iter().map(str::to_string).collect();
            let ips = if pod.pointer("/spec/hostNetwork").and_then(Value::as_bool) == Some(true) {
                vec![host_ip.clone()]
            } else if !given.is_empty() {
                given
            } else {
                let fixed = ip.iter().flat_map(|l| l.split(',')).map(str::trim).filter(|a| !a.is_empty());
                let mut ips: Vec<String> = fixed.map(str::to_string).collect();
                if ips.is_empty() {
                    ips.push(self.allocate_pod_ip());
                }
                if ips.len() == 1
                    && let Ok(v4) = ips[0].parse::<Ipv4Addr>()
                    && let Some(v6) = self.pod_ip6_for(v4)
                {
                    ips.push(v6);
                }
                ips
            };
            let ready = annotation(&pod, ANNOTATION_READY) != Some("false");
            let mut next = pod.clone();
            if s(&pod, "/spec/nodeName").is_none() {
                next["spec"]["nodeName"] = json!(node);
                if let Err(e) = self.update(ids::pods(), ns, &name, next.clone(), Sub::Main) {
                    tracing::debug!(error = %e, "scheduler: binding a pod");
                    continue;
                }
                let Ok(bound) = self.get(ids::pods(), ns, &name) else { continue };
                next = bound;
            }
            let t = now();
            let rs = if ready { "True" } else { "False" };
            next["status"] = json!({
                "phase": "Running", "qosClass": "BestEffort",
                "hostIP": host_ip, "hostIPs": [{"ip": host_ip}],
                "startTime": t,
                "conditions": [
                    {"type": "PodScheduled", "status": "True", "lastTransitionTime": t},
                    {"type": "Initialized", "status": "True", "lastTransitionTime": t},
                    {"type": "ContainersReady", "status": rs, "lastTransitionTime": t},
                    {"type": "Ready", "status": rs, "lastTransitionTime": t},
                ],
            });
            set_pod_ips(&mut next["status"], &ips);
            if let Err(e) = self.update(ids::pods(), ns, &name, next, Sub::Status) {
                tracing::debug!(error = %e, "kubelet: pod status");
            }
        }
    }

    fn owning_deployment(&self, pod: &Value) -> Option<Value> {
        let refs = pod.pointer("/metadata/ownerReferences").and_then(Value::as_array)?;
        let r = refs.iter().find(|r| r.get("kind").and_then(Value::as_str) == Some("Deployment"))?;
        let ns = s(pod, "/metadata/namespace")?;
        let d = self.get_obj(ids::deployments(), &(ns.to_string(), r.get("name")?.as_str()?.to_string()))?;
        (d.pointer("/metadata/uid") == r.get("uid")).then(|| d.clone())
    }

    /// The IP (if the test fixed one) and node for a pod.
    fn place_pod(&self, pod: &Value, owner: Option<&Value>) -> (Option<String>, Option<String>) {
        let mut ip = annotation(pod, ANNOTATION_POD_IP).map(str::to_string);
        let mut node = s(pod, "/spec/nodeName").map(str::to_string);
        if ip.is_none()
            && let Some(d) = owner
            && let Some(list) = annotation(d, ANNOTATION_POD_IPS)
        {
            // Taken by another pod: this pod's own address does not count.
            let own = s(pod, "/status/podIP");
            let taken = |ip: &str| self.pod_placement.pods_with_ip(ip) > usize::from(own == Some(ip));
            let nodes: Vec<&str> = annotation(d, ANNOTATION_POD_NODES).map(|n| n.split(',').map(str::trim).collect()).unwrap_or_default();
            if let Some((i, free)) = list.split(',').map(str::trim).enumerate().find(|(_, c)| !c.is_empty() && !taken(c)) {
                ip = Some(free.to_string());
                if node.is_none() {
                    node = nodes.get(i).filter(|n| !n.is_empty()).map(|n| n.to_string());
                }
            }
        }
        if node.is_none() {
            // Least-loaded node first, as a spreading scheduler would.
            node = self.objects[ids::nodes()]
                .values()
                .filter_map(|n| s(n, "/metadata/name"))
                .min_by_key(|n| (self.pod_placement.pods_on(n), *n))
                .map(str::to_string);
        }
        (ip, node)
    }

    fn node_ip(&self, node: &str) -> Option<String> {
        let n = self.get_obj(ids::nodes(), &(String::new(), node.to_string()))?;
        n.pointer("/status/addresses")?
            .as_array()?
            .iter()
            .find(|a| a.get("type").and_then(Value::as_str) == Some("InternalIP"))
            .and_then(|a| a.get("address"))
            .and_then(Value::as_str)
            .map(str::to_string)
    }

    fn node_zone(&self, node: &str) -> Option<String> {
        let n = self.get_obj(ids::nodes(), &(String::new(), node.to_string()))?;
        s(n, "/metadata/labels/topology.kubernetes.io~1zone").map(str::to_string)
    }

    // ---- EndpointSlices ----

    /// A pod or Service in `ns` changed: its slices are synced after the
    /// delay (a sync already waiting takes this change along), or now.
    fn schedule_endpoint_slices(&mut self, ns: &str) {
        let delay = self.cfg.endpoint_slice_delay;
        if delay.is_zero() {
            self.sync_endpoint_slices(ns, false);
        } else {
            self.slice_sync.pending.entry(ns.to_string()).or_insert_with(|| tokio::time::Instant::now() + delay);
        }
    }

    /// Runs the EndpointSlice syncs due at `now` (from the timer task).
    pub(crate) fn fire_endpoint_slice_syncs(&mut self, now: tokio::time::Instant) {
        let due: Vec<String> = self.slice_sync.pending.iter().filter(|(_, t)| **t <= now).map(|(ns, _)| ns.clone()).collect();
        for ns in due {
            self.slice_sync.pending.remove(&ns);
            self.sync_endpoint_slices(&ns, true);
        }
    }

    /// Writes the slices of the Services of `ns`, each Service's writes in a
    /// random order; with `may_split`, half the time only some of them, and
    /// the rest (planned again) a delay later.
    fn sync_endpoint_slices(&mut self, ns: &str, may_split: bool) {
        let mut split = false;
        for mut writes in self.endpoint_slice_writes(ns) {
            self.slice_sync.shuffle(&mut writes);
            if may_split && writes.len() > 1 && self.slice_sync.below(2) == 0 {
                let first = 1 + self.slice_sync.below(writes.len() - 1);
                writes.truncate(first);
                split = true;
            }
            for write in writes {
                self.write_endpoint_slice(ns, write);
            }
        }
        if split {
            let later = tokio::time::Instant::now() + self.cfg.endpoint_slice_delay;
            self.slice_sync.pending.entry(ns.to_string()).or_insert(later);
        }
        // Slices whose Service is gone are garbage-collected through their owner reference.
    }

    fn write_endpoint_slice(&mut self, ns: &str, write: SliceWrite) {
        match write {
            SliceWrite::Update(name, next) => {
                if let Err(e) = self.update(ids::endpointslices(), ns, &name, next, Sub::Main) {
                    tracing::debug!(error = %e, "endpointslice controller: update");
                }
            }
            SliceWrite::Create(obj) => {
                if let Err(e) = self.create(ids::endpointslices(), ns, obj) {
                    tracing::debug!(error = %e, "endpointslice controller: create");
                }
            }
            SliceWrite::Remove(name) => {
                let _ = self.remove(ids::endpointslices(), &(ns.to_string(), name));
            }
        }
    }

    /// The EndpointSlice controller's writes in `ns`, one list per Service.
    /// They touch slices only, so all are planned first from the namespace's
    /// objects as they are, borrowed: copying its pods, Services and slices
    /// each time cost more than the writes.
    fn endpoint_slice_writes(&self, ns: &str) -> Vec<Vec<SliceWrite>> {
        let pods: Vec<&Value> = self.iter_ns(ids::pods(), ns).collect();
        let slices: Vec<&Value> = self.iter_ns(ids::endpointslices(), ns).collect();
        let mut out = Vec::new();
        for svc in self.iter_ns(ids::services(), ns) {
            let name = s(svc, "/metadata/name").unwrap_or_default();
            let managed: Vec<&Value> = slices
                .iter()
                .copied()
                .filter(|sl| {
                    s(sl, "/metadata/labels/kubernetes.io~1service-name") == Some(name)
                        && s(sl, "/metadata/labels/endpointslice.kubernetes.io~1managed-by") == Some(MANAGED_BY)
                })
                .collect();
            let selector = pointer(svc, "/spec/selector").and_then(Value::as_object).filter(|m| !m.is_empty());
            let external = s(svc, "/spec/type") == Some("ExternalName");
            let (Some(selector), false) = (selector, external) else {
                out.push(managed.iter().filter_map(|sl| s(sl, "/metadata/name")).map(|n| SliceWrite::Remove(n.to_string())).collect());
                continue;
            };
            if terminating(svc) {
                continue;
            }
            let types = address_types(svc);
            let address_type = |sl: &Value| s(sl, "/addressType").unwrap_or(IPV4).to_string();
            // Slices of a family the Service no longer has go.
            let mut writes: Vec<SliceWrite> = managed
                .iter()
                .filter(|sl| !types.contains(&address_type(sl).as_str()))
                .filter_map(|sl| s(sl, "/metadata/name"))
                .map(|n| SliceWrite::Remove(n.to_string()))
                .collect();
            for t in types {
                let of_type: Vec<&Value> = managed.iter().copied().filter(|sl| address_type(sl) == t).collect();
                let groups = self.desired_slices(svc, selector, &pods, t);
                writes.extend(plan_slices(svc, name, t, groups, &of_type, self.cfg.max_endpoints_per_slice));
            }
            out.push(writes);
        }
        out.retain(|w: &Vec<SliceWrite>| !w.is_empty());
        out
    }

    /// The endpoints of `address_type` (`IPv4`, `IPv6`) grouped by their
    /// resolved port list, in pod name order, with the hints the Service asks for.
    fn desired_slices(
        &self,
        svc: &Value,
        selector: &serde_json::Map<String, Value>,
        pods: &[&Value],
        address_type: &str,
    ) -> Vec<(Value, Vec<Value>)> {
        let svc_ports: Vec<Value> = svc.pointer("/spec/ports").and_then(Value::as_array).cloned().unwrap_or_default();
        let mut groups: Vec<(Value, Vec<Value>)> = Vec::new();
        let mut sorted: Vec<&Value> = pods.iter().copied().filter(|p| selector_matches(selector, p)).collect();
        sorted.sort_by_key(|p| s(p, "/metadata/name").unwrap_or_default().to_string());
        for pod in sorted {
            let Some(node) = s(pod, "/spec/nodeName") else { continue };
            let addresses: Vec<&str> =
                pod_ips(pod).into_iter().filter(|ip| family_of(ip) == Some(address_type)).collect();
            if addresses.is_empty() {
                continue;
            }
            if matches!(s(pod, "/status/phase"), Some("Succeeded" | "Failed")) {
                continue;
            }
            let ports: Vec<Value> = svc_ports.iter().filter_map(|sp| resolve_port(sp, pod)).collect();
            let is_ready = pod_ready(pod);
            let term = terminating(pod);
            let mut ep = json!({
                "addresses": addresses,
                "conditions": {"ready": is_ready && !term, "serving": is_ready, "terminating": term},
                "nodeName": node,
                "targetRef": {"kind": "Pod", "namespace": pod["metadata"]["namespace"], "name": pod["metadata"]["name"], "uid": pod["metadata"]["uid"]},
            });
            if let Some(z) = self.node_zone(node) {
                ep["zone"] = json!(z);
            }
            let ports = Value::Array(ports);
            match groups.iter_mut().find(|(p, _)| *p == ports) {
                Some((_, eps)) => eps.push(ep),
                None => groups.push((ports, vec![ep])),
            }
        }
        match hint_mode(svc) {
            Hints::None => {}
            Hints::Close { nodes } => {
                for ep in groups.iter_mut().flat_map(|(_, eps)| eps.iter_mut()).filter(|ep| endpoint_ready(ep)) {
                    let mut hints = serde_json::Map::new();
                    if let Some(z) = ep.get("zone").cloned() {
                        hints.insert("forZones".into(), json!([{"name": z}]));
                    }
                    if nodes && let Some(n) = ep.get("nodeName").cloned() {
                        hints.insert("forNodes".into(), json!([{"name": n}]));
                    }
                    if !hints.is_empty() {
                        ep["hints"] = Value::Object(hints);
                    }
                }
            }
            Hints::Auto => {
                let ready: Vec<&Value> =
                    groups.iter().flat_map(|(_, eps)| eps).filter(|ep| endpoint_ready(ep)).collect();
                if auto_hints(&ready, &self.hint_zones()) {
                    for ep in groups.iter_mut().flat_map(|(_, eps)| eps.iter_mut()).filter(|ep| endpoint_ready(ep)) {
                        if let Some(z) = ep.get("zone").cloned() {
                            ep["hints"] = json!({"forZones": [{"name": z}]});
                        }
                    }
                }
            }
        }
        groups
    }

    /// The zones of the ready nodes the topology cache counts (not the
    /// control plane's), or `None` when one of them has no zone (the real
    /// cache then has no node information and gives no hints).
    fn hint_zones(&self) -> Option<BTreeSet<String>> {
        let mut zones = BTreeSet::new();
        for n in self.objects[ids::nodes()].values() {
            let labels = pointer(n, "/metadata/labels");
            let excluded = ["node-role.kubernetes.io/control-plane", "node-role.kubernetes.io/master"]
                .iter()
                .any(|l| labels.and_then(|m| m.get(*l)).is_some());
            let ready = pointer(n, "/status/conditions").and_then(Value::as_array).is_some_and(|cs| {
                cs.iter().any(|c| {
                    c.get("type").and_then(Value::as_str) == Some("Ready")
                        && c.get("status").and_then(Value::as_str) == Some("True")
                })
            });
            if excluded || !ready {
                continue;
            }
            zones.insert(s(n, "/metadata/labels/topology.kubernetes.io~1zone").filter(|z| !z.is_empty())?.to_string());
        }
        Some(zones)
    }

    /// Changes a pod as a test asks: IP, node, readiness, labels.
    pub fn update_pod(&mut self, ns: &str, name: &str, u: &super::PodUpdate) -> Result<Value, ApiError> {
        let mut pod = self.get(ids::pods(), ns, name)?;
        if u.labels.is_some() || u.node.is_some() {
            if let Some(l) = &u.labels {
                pod["metadata"]["labels"] = json!(l);
            }
            if let Some(n) = &u.node {
                pod["spec"]["nodeName"] = json!(n);
            }
            // The node of a running pod is immutable on a real server; tests
            // move pods anyway, so this write goes around validation.
            pod = self.update(ids::pods(), ns, name, pod, Sub::Main)?;
        }
        let mut status = pod.get("status").cloned().unwrap_or_else(|| json!({}));
        if u.ips.is_some() || u.ip.is_some() {
            let mut ips: Vec<String> = match &u.ips {
                Some(list) => list.iter().map(ToString::to_string).collect(),
                None => pod_ips(&pod).into_iter().map(str::to_string).collect(),
            };
            if let Some(ip) = u.ip {
                let family = if ip.is_ipv6() { IPV6 } else { IPV4 };
                match ips.iter().position(|x| family_of(x) == Some(family)) {
                    Some(i) => ips[i] = ip.to_string(),
                    None if ip.is_ipv4() => ips.insert(0, ip.to_string()),
                    None => ips.push(ip.to_string()),
                }
            }
            set_pod_ips(&mut status, &ips);
        }
        if let Some(n) = &u.node
            && let Some(h) = self.node_ip(n)
        {
            status["hostIP"] = json!(h);
            status["hostIPs"] = json!([{"ip": h}]);
        }
        if let Some(ready) = u.ready {
            let v = if ready { "True" } else { "False" };
            let conds = status.get("conditions").and_then(Value::as_array).cloned().unwrap_or_default();
            // A condition whose status stays keeps its transition time, as the kubelet writes it.
            let since = |kind: &str| {
                conds
                    .iter()
                    .find(|c| c.get("type").and_then(Value::as_str) == Some(kind) && c.get("status").and_then(Value::as_str) == Some(v))
                    .and_then(|c| c.get("lastTransitionTime").cloned())
                    .unwrap_or_else(|| json!(now()))
            };
            let (containers, pod_ready) = (since("ContainersReady"), since("Ready"));
            let mut out: Vec<Value> = conds.iter().filter(|c| !matches!(c.get("type").and_then(Value::as_str), Some("Ready" | "ContainersReady"))).cloned().collect();
            out.push(json!({"type": "ContainersReady", "status": v, "lastTransitionTime": containers}));
            out.push(json!({"type": "Ready", "status": v, "lastTransitionTime": pod_ready}));
            status["conditions"] = Value::Array(out);
        }
        if u.restarted {
            let names: Vec<Value> = pod.pointer("/spec/containers").and_then(Value::as_array).into_iter().flatten().filter_map(|c| c.get("name").cloned()).collect();
            let before: Vec<Value> = status.get("containerStatuses").and_then(Value::as_array).cloned().unwrap_or_default();
            let restarts = |name: &Value| {
                before.iter().find(|c| c.get("name") == Some(name)).and_then(|c| c.get("restartCount")).and_then(Value::as_u64).unwrap_or(0)
            };
            let ready = status.get("conditions").and_then(Value::as_array).into_iter().flatten().any(|c| c.get("type").and_then(Value::as_str) == Some("Ready") && c.get("status").and_then(Value::as_str) == Some("True"));
            status["containerStatuses"] = names
                .iter()
                .map(|n| json!({"name": n, "ready": ready, "restartCount": restarts(n) + 1, "started": true, "state": {"running": {"startedAt": now()}}}))
                .collect();
        }
        if status != pod.get("status").cloned().unwrap_or_else(|| json!({})) {
            pod["status"] = status;
            pod = self.update(ids::pods(), ns, name, pod, Sub::Status)?;
        }
        self.reconcile();
        Ok(pod)
    }

}

/// The EndpointSlice port for a Service port on one pod: the target port,
/// resolved through the pod's named container ports; `None` when a named
/// port is not found on this pod.
fn resolve_port(sp: &Value, pod: &Value) -> Option<Value> {
    let protocol = sp.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
    let target = sp.get("targetPort").or_else(|| sp.get("port"))?;
    let port = match target {
        Value::Number(n) => n.as_u64()?,
        Value::String(name) => match name.parse::<u64>() {
            Ok(n) => n,
            Err(_) => pod
                .pointer("/spec/containers")?
                .as_array()?
                .iter()
                .filter_map(|c| c.get("ports").and_then(Value::as_array))
                .flatten()
                .find(|p| p.get("name").and_then(Value::as_str) == Some(name) && p.get("protocol").and_then(Value::as_str).unwrap_or("TCP") == protocol)?
                .get("containerPort")?
                .as_u64()?,
        },
        _ => return None,
    };
    let mut out = json!({"name": sp.get("name").and_then(Value::as_str).unwrap_or(""), "port": port, "protocol": protocol});
    if let Some(ap) = sp.get("appProtocol") {
        out["appProtocol"] = ap.clone();
    }
    Some(out)
}

impl ApiError {
    /// The same error with another message.
    pub(crate) fn with_message(mut self, m: &str) -> Self {
        self.message = m.to_string();
        self
    }
}

#[cfg(test)]
mod test {
    use super::super::Config;
    use super::*;
    use std::time::Duration;

    fn store(cfg: Config) -> Store {
        let (tx, _rx) = tokio::sync::watch::channel(0);
        Store::new(cfg, tx)
    }

    fn seeded(seed: u64) -> Store {
        store(Config { seed: Some(seed), ..Config::default() })
    }

    fn pod_name(i: usize) -> String {
        format!("web-{i:03}")
    }

    fn ip(i: usize) -> String {
        format!("10.1.{}.{}", i / 200, 10 + i % 200)
    }

    /// A Service `web` (named target port) and pods `0..n` behind it.
    fn web(st: &mut Store, pods: std::ops::Range<usize>) {
        if st.get(ids::services(), "default", "web").is_err() {
            let svc = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "labels": {"tier": "front"}},
                "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "www"}]}});
            st.create(ids::services(), "default", svc).expect("service");
        }
        for i in pods {
            let pod = json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": pod_name(i), "labels": {"app": "web"}, "annotations": {ANNOTATION_POD_IP: ip(i)}},
                "spec": {"containers": [{"name": "web", "image": "x", "ports": [{"name": "www", "containerPort": 8080}]}]}});
            st.create(ids::pods(), "default", pod).expect("pod");
        }
        st.reconcile();
    }

    /// Runs every EndpointSlice sync, split ones too, as if their time had come.
    fn settle(st: &mut Store) {
        let later = tokio::time::Instant::now() + Duration::from_secs(3600);
        for _ in 0..100 {
            if !st.slice_sync.is_pending() {
                return;
            }
            st.fire_endpoint_slice_syncs(later);
        }
        panic!("the EndpointSlice controller did not settle");
    }

    fn slices(st: &Store) -> Vec<Value> {
        st.iter_ns(ids::endpointslices(), "default").cloned().collect()
    }

    fn addresses(sl: &Value) -> Vec<String> {
        endpoints_of(sl).iter().filter_map(|e| e.pointer("/addresses/0").and_then(Value::as_str)).map(str::to_string).collect()
    }

    /// Every slice within the limit, and the addresses of all, each once, sorted.
    fn covered(st: &Store, max: usize) -> Vec<String> {
        let mut all = Vec::new();
        for sl in slices(st) {
            assert!(endpoints_of(&sl).len() <= max, "a slice of {} endpoints", endpoints_of(&sl).len());
            assert_eq!(sl["ports"], json!([{"name": "http", "port": 8080, "protocol": "TCP"}]));
            assert_eq!(sl.pointer("/metadata/labels/tier"), Some(&json!("front")));
            all.extend(addresses(&sl));
        }
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n, "an endpoint in two slices");
        all
    }

    fn ips(range: impl Iterator<Item = usize>) -> Vec<String> {
        let mut v: Vec<String> = range.map(ip).collect();
        v.sort();
        v
    }

    /// The slice writes in the log after `rv`: (event, name, addresses).
    fn slice_writes(st: &Store, rv: u64) -> Vec<(&'static str, String, Vec<String>)> {
        st.log
            .iter()
            .filter(|e| e.kind == ids::endpointslices() && e.rv > rv)
            .map(|e| (e.etype.as_str(), s(&e.obj, "/metadata/name").unwrap_or_default().to_string(), addresses(&e.obj)))
            .collect()
    }

    #[test]
    fn endpoints_are_split_at_the_limit_and_not_rebalanced() {
        let mut st = seeded(1);
        web(&mut st, 0..250);
        assert!(slices(&st).is_empty(), "no slice in the instant of the change");
        settle(&mut st);
        let before = slices(&st);
        assert_eq!(before.len(), 3, "250 endpoints: 3 slices");
        assert_eq!(covered(&st, 100), ips(0..250));
        let sizes = |v: &[Value]| {
            let mut n: Vec<usize> = v.iter().map(|sl| endpoints_of(sl).len()).collect();
            n.sort();
            n
        };
        assert_eq!(sizes(&before), [50, 100, 100]);

        // Scale 250 -> 150: every third pod and then some go; what stays, stays put.
        let gone: Vec<usize> = (0..250).filter(|i| i % 3 == 0).chain((200..250).filter(|i| i % 3 != 0)).take(100).collect();
        for &i in &gone {
            st.delete(ids::pods(), "default", &pod_name(i), DeleteOptions { grace: Some(super::super::Grace::Immediate), ..Default::default() })
                .expect("delete");
        }
        st.reconcile();
        settle(&mut st);
        assert_eq!(covered(&st, 100), ips((0..250).filter(|i| !gone.contains(i))));
        let slice_of = |v: &[Value], a: &str| {
            v.iter().find(|sl| addresses(sl).iter().any(|x| x == a)).and_then(|sl| s(sl, "/metadata/name").map(str::to_string))
        };
        let after = slices(&st);
        for i in (0..250).filter(|i| !gone.contains(i)) {
            assert_eq!(slice_of(&after, &ip(i)), slice_of(&before, &ip(i)), "endpoint {i} kept its slice");
        }

        // New endpoints fill the slices with room before a slice is created.
        let rv = st.rv;
        web(&mut st, 250..300);
        settle(&mut st);
        assert_eq!(covered(&st, 100), ips((0..300).filter(|i| !gone.contains(i))));
        assert!(slice_writes(&st, rv).iter().all(|(t, _, _)| *t == "MODIFIED"), "no slice created: {:?}", slice_writes(&st, rv));
        assert!(slices(&st).len() <= 3);
        // Beyond all room (66, 67 and 67 endpoints now): a new slice of 100,
        // and the 50 left fit no slice whole, so another (as the real one:
        // leftovers are not spread over several slices).
        web(&mut st, 300..450);
        settle(&mut st);
        assert_eq!(covered(&st, 100), ips((0..450).filter(|i| !gone.contains(i))));
        assert_eq!(sizes(&slices(&st)), [50, 66, 67, 67, 100]);
    }

    #[test]
    fn no_endpoints_keep_one_placeholder_and_the_limit_is_configurable() {
        let mut st = store(Config { max_endpoints_per_slice: 2, seed: Some(7), ..Config::default() });
        web(&mut st, 0..0);
        settle(&mut st);
        let placeholder = slices(&st);
        assert_eq!(placeholder.len(), 1);
        assert_eq!((&placeholder[0]["ports"], &placeholder[0]["endpoints"]), (&json!([]), &json!([])));
        web(&mut st, 0..5);
        settle(&mut st);
        assert_eq!(covered(&st, 2), ips(0..5));
        assert_eq!(slices(&st).len(), 3);
        let names: BTreeSet<String> = slices(&st).iter().filter_map(|sl| s(sl, "/metadata/name").map(str::to_string)).collect();
        assert!(names.contains(s(&placeholder[0], "/metadata/name").unwrap_or_default()), "the placeholder is reused");
        for i in 0..5 {
            st.delete(ids::pods(), "default", &pod_name(i), DeleteOptions { grace: Some(super::super::Grace::Immediate), ..Default::default() })
                .expect("delete");
        }
        st.reconcile();
        settle(&mut st);
        let left = slices(&st);
        assert_eq!(left.len(), 1, "back to one placeholder");
        assert!(endpoints_of(&left[0]).is_empty());
    }

    #[test]
    fn zero_delay_writes_slices_with_the_change() {
        let mut st = store(Config { endpoint_slice_delay: Duration::ZERO, ..Config::default() });
        web(&mut st, 0..120);
        assert!(!st.slice_sync.is_pending());
        assert_eq!(covered(&st, 100), ips(0..120));
        assert_eq!(slices(&st).len(), 2);
    }

    #[test]
    fn the_same_seed_writes_slices_in_the_same_order() {
        let run = |seed: u64| {
            let mut st = seeded(seed);
            web(&mut st, 0..250);
            settle(&mut st);
            let rv = st.rv;
            // A change that touches every slice at once: a new port name.
            let mut svc = st.get(ids::services(), "default", "web").expect("service");
            svc["spec"]["ports"][0]["name"] = json!("web");
            st.update(ids::services(), "default", "web", svc, Sub::Main).expect("update");
            st.reconcile();
            settle(&mut st);
            for i in (0..250).filter(|i| i % 7 == 0) {
                st.delete(ids::pods(), "default", &pod_name(i), DeleteOptions { grace: Some(super::super::Grace::Immediate), ..Default::default() })
                    .expect("delete");
            }
            st.reconcile();
            settle(&mut st);
            slice_writes(&st, rv)
        };
        let (a, b, c) = (run(42), run(42), run(43));
        assert!(a.len() >= 6, "{a:?}");
        assert_eq!(a, b, "same seed, same writes in the same order");
        assert_ne!(a, c, "another seed, another order (or names)");
    }

    /// The slices of Service `web`, by address type: (name, addresses, hints) of each endpoint.
    fn by_type(st: &Store) -> BTreeMap<String, Vec<(String, Vec<String>, Value)>> {
        let mut out: BTreeMap<String, Vec<(String, Vec<String>, Value)>> = BTreeMap::new();
        for sl in slices(st) {
            let t = s(&sl, "/addressType").unwrap_or_default().to_string();
            for e in endpoints_of(&sl) {
                let pod = s(e, "/targetRef/name").unwrap_or_default().to_string();
                let addrs = strings(e.get("addresses"));
                out.entry(t.clone()).or_default().push((pod, addrs, e.get("hints").cloned().unwrap_or(Value::Null)));
            }
            out.entry(t).or_default();
        }
        for v in out.values_mut() {
            v.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        }
        out
    }

    /// Sets a field of Service `web`'s spec (`null`: removes it).
    fn set_spec(st: &mut Store, field: &str, value: Value) {
        let mut svc = st.get(ids::services(), "default", "web").expect("service");
        match (value, svc["spec"].as_object_mut()) {
            (Value::Null, Some(spec)) => {
                spec.remove(field);
            }
            (v, _) => svc["spec"][field] = v,
        }
        st.update(ids::services(), "default", "web", svc, Sub::Main).expect("update");
        st.reconcile();
    }

    #[test]
    fn dual_stack_services_get_slices_per_family_and_pods_both_addresses() {
        let mut st = store(Config { endpoint_slice_delay: Duration::ZERO, seed: Some(3), ..Config::default() });
        web(&mut st, 0..3);
        let pod = st.get(ids::pods(), "default", &pod_name(0)).expect("pod");
        let ips = pod_ips(&pod).into_iter().map(str::to_string).collect::<Vec<_>>();
        assert_eq!(ips.len(), 2, "{pod}");
        assert_eq!((ips[0].as_str(), family_of(&ips[1])), (ip(0).as_str(), Some(IPV6)));
        assert_eq!(ips[1], "fd00:10:244::a01:a", "10.1.0.10's number in the IPv6 range");
        // SingleStack (the default): IPv4 slices only.
        assert_eq!(by_type(&st).keys().collect::<Vec<_>>(), ["IPv4"]);

        set_spec(&mut st, "ipFamilyPolicy", json!("PreferDualStack"));
        let svc = st.get(ids::services(), "default", "web").expect("service");
        assert_eq!(svc["spec"]["ipFamilies"], json!(["IPv4", "IPv6"]));
        let cluster_ips = strings(svc.pointer("/spec/clusterIPs"));
        assert_eq!(cluster_ips.iter().map(|a| family_of(a)).collect::<Vec<_>>(), [Some(IPV4), Some(IPV6)]);
        assert_eq!(svc["spec"]["clusterIP"], json!(cluster_ips[0]));
        let slices = by_type(&st);
        assert_eq!(slices.keys().collect::<Vec<_>>(), ["IPv4", "IPv6"]);
        for (t, eps) in &slices {
            assert_eq!(eps.len(), 3, "{t}: {eps:?}");
            for (pod, addrs, _) in eps {
                let p = st.get(ids::pods(), "default", pod).expect("pod");
                let want: Vec<&str> = pod_ips(&p).into_iter().filter(|a| family_of(a) == Some(t.as_str())).collect();
                assert_eq!(addrs, &want);
            }
        }
        // A pod whose manifest gives its addresses keeps them; one with IPv4 only is in the IPv4 slice only.
        let given = json!([{"ip": "10.1.9.1"}, {"ip": "fd00:10:244::99"}]);
        for (name, ips) in [("given", given), ("v4-only", json!([{"ip": "10.1.9.2"}]))] {
            let container = json!({"name": "web", "image": "x", "ports": [{"name": "www", "containerPort": 8080}]});
            let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": "web"}},
                "spec": {"containers": [container]}});
            st.create(ids::pods(), "default", pod).expect("pod");
            let mut p = st.get(ids::pods(), "default", name).expect("pod");
            p["status"] = json!({"podIPs": ips});
            st.update(ids::pods(), "default", name, p, Sub::Status).expect("status");
            st.reconcile();
        }
        let given = st.get(ids::pods(), "default", "given").expect("pod");
        assert_eq!(given["status"]["podIP"], json!("10.1.9.1"));
        assert_eq!(pod_ips(&given), ["10.1.9.1", "fd00:10:244::99"]);
        let slices = by_type(&st);
        assert!(slices["IPv6"].iter().any(|(p, a, _)| p == "given" && a == &["fd00:10:244::99"]), "{slices:?}");
        assert!(!slices["IPv6"].iter().any(|(p, _, _)| p == "v4-only"));
        assert!(slices["IPv4"].iter().any(|(p, a, _)| p == "v4-only" && a == &["10.1.9.2"]));

        // A test moving a pod's IPv4 address keeps its IPv6 one.
        let v6 = pod_ips(&st.get(ids::pods(), "default", &pod_name(1)).expect("pod"))[1].to_string();
        let update = super::super::PodUpdate { ip: Some("10.1.8.8".parse().expect("ip")), ..Default::default() };
        let moved = st.update_pod("default", &pod_name(1), &update).expect("update");
        assert_eq!(pod_ips(&moved), vec!["10.1.8.8", v6.as_str()]);

        // Back to SingleStack: the IPv6 ClusterIP and slices go.
        set_spec(&mut st, "ipFamilyPolicy", json!("SingleStack"));
        let svc = st.get(ids::services(), "default", "web").expect("service");
        assert_eq!((&svc["spec"]["ipFamilies"], &svc["spec"]["clusterIPs"]), (&json!(["IPv4"]), &json!([cluster_ips[0]])));
        assert_eq!(by_type(&st).keys().collect::<Vec<_>>(), ["IPv4"]);
    }

    #[test]
    fn a_single_stack_cluster_gives_pods_one_address() {
        let single = Config { pod_cidr_v6: None, service_cidr_v6: None, endpoint_slice_delay: Duration::ZERO, ..Config::default() };
        let mut st = store(single);
        web(&mut st, 0..1);
        assert_eq!(pod_ips(&st.get(ids::pods(), "default", &pod_name(0)).expect("pod")), vec![ip(0).as_str()]);
        let mut svc = st.get(ids::services(), "default", "web").expect("service");
        svc["spec"]["ipFamilyPolicy"] = json!("PreferDualStack");
        let svc = st.update(ids::services(), "default", "web", svc, Sub::Main).expect("update");
        assert_eq!(svc["spec"]["ipFamilies"], json!(["IPv4"]));
    }

    #[test]
    fn hints_follow_the_traffic_distribution() {
        let mut st = store(Config { endpoint_slice_delay: Duration::ZERO, ..Config::default() });
        let zoned = |name: &str, last: u8, zone: &str| {
            super::super::NodeConfig::new(name, IpAddr::from([192, 0, 2, last])).with_zone(zone)
        };
        st.add_node(&zoned("node-1", 1, "zone-a")).expect("node");
        st.add_node(&zoned("node-2", 2, "zone-b")).expect("node");
        web(&mut st, 0..4);
        let hints = |st: &Store| by_type(st)["IPv4"].iter().map(|(p, _, h)| (p.clone(), h.clone())).collect::<Vec<_>>();
        let node_of = |st: &Store, i: usize| {
            let pod = st.get(ids::pods(), "default", &pod_name(i)).expect("pod");
            s(&pod, "/spec/nodeName").map(str::to_string)
        };
        let zone_of = |n: &str| if n == "node-1" { "zone-a" } else { "zone-b" };
        assert!(hints(&st).iter().all(|(_, h)| h.is_null()), "no hints without a trafficDistribution");

        set_spec(&mut st, "trafficDistribution", json!("PreferClose"));
        let unready = super::super::PodUpdate { ready: Some(false), ..Default::default() };
        st.update_pod("default", &pod_name(3), &unready).expect("unready");
        for (i, (pod, h)) in hints(&st).into_iter().enumerate() {
            assert_eq!(pod, pod_name(i));
            let node = node_of(&st, i).expect("scheduled");
            let want = if i == 3 { Value::Null } else { json!({"forZones": [{"name": zone_of(&node)}]}) };
            assert_eq!(h, want, "{pod} on {node}");
        }
        set_spec(&mut st, "trafficDistribution", json!("PreferSameNode"));
        let (_, h) = &hints(&st)[0];
        let node = node_of(&st, 0).expect("scheduled");
        assert_eq!(h, &json!({"forZones": [{"name": zone_of(&node)}], "forNodes": [{"name": node}]}));
        set_spec(&mut st, "trafficDistribution", Value::Null);
        assert!(hints(&st).iter().all(|(_, h)| h.is_null()), "hints removed");

        // topology-mode Auto: zones while every node and endpoint has one and there are two zones.
        let mut svc = st.get(ids::services(), "default", "web").expect("service");
        svc["metadata"]["annotations"] = json!({ANNOTATION_TOPOLOGY_MODE: "Auto"});
        st.update(ids::services(), "default", "web", svc, Sub::Main).expect("update");
        st.reconcile();
        assert_eq!(hints(&st).iter().filter(|(_, h)| h.get("forZones").is_some()).count(), 3, "{:?}", hints(&st));
        st.add_node(&zoned("node-2", 2, "zone-a")).expect("node");
        assert!(hints(&st).iter().all(|(_, h)| h.is_null()), "one zone: none, {:?}", hints(&st));
    }

    #[test]
    fn some_syncs_come_in_two_moments() {
        // Over many seeds, a sync with several writes is split about half the time.
        let mut split = 0;
        for seed in 0..40 {
            let mut st = seeded(seed);
            web(&mut st, 0..250);
            st.fire_endpoint_slice_syncs(tokio::time::Instant::now() + Duration::from_secs(3600));
            if st.slice_sync.is_pending() {
                split += 1;
                assert!(slices(&st).len() < 3, "part of the slices written");
                settle(&mut st);
            }
            assert_eq!(covered(&st, 100), ips(0..250));
        }
        assert!((8..=32).contains(&split), "{split} of 40 syncs split");
    }

    /// The pod placement index against a count of the pods themselves.
    fn placement_matches_the_pods(st: &Store) {
        let pods: Vec<&Value> = st.objects[ids::pods()].values().collect();
        for p in &pods {
            if let Some(ip) = s(p, "/status/podIP") {
                let n = pods.iter().filter(|q| s(q, "/status/podIP") == Some(ip)).count();
                assert_eq!(st.pod_placement.pods_with_ip(ip), n, "{ip}");
            }
            if let Some(node) = s(p, "/spec/nodeName") {
                let n = pods.iter().filter(|q| s(q, "/spec/nodeName") == Some(node)).count();
                assert_eq!(st.pod_placement.pods_on(node), n, "{node}");
            }
        }
    }

    #[test]
    fn pods_are_spread_and_addressed_from_an_index_kept_with_every_write() {
        let node = |i: u8| super::super::NodeConfig::new(format!("node-{i}"), std::net::IpAddr::V4(Ipv4Addr::new(192, 0, 2, i)));
        let mut st = store(Config { seed: Some(7), nodes: (1..=3).map(node).collect(), ..Config::default() });
        let d = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "batch"},
            "spec": {"replicas": 30, "selector": {"matchLabels": {"app": "batch"}},
                "template": {"metadata": {"labels": {"app": "batch"}}, "spec": {"containers": [{"name": "c", "image": "x"}]}}}});
        st.create(ids::deployments(), "default", d).expect("deployment");
        st.reconcile();
        placement_matches_the_pods(&st);
        let nodes: Vec<String> = st.objects[ids::nodes()].values().filter_map(|n| s(n, "/metadata/name")).map(str::to_string).collect();
        let counts: Vec<usize> = nodes.iter().map(|n| st.pod_placement.pods_on(n)).collect();
        assert_eq!(counts.iter().sum::<usize>(), 30, "{nodes:?}");
        assert!(counts.iter().max().zip(counts.iter().min()).is_some_and(|(a, b)| a - b <= 1), "spread evenly: {counts:?}");
        let ips: BTreeSet<String> = st.iter_ns(ids::pods(), "default").filter_map(|p| s(p, "/status/podIP")).map(str::to_string).collect();
        assert_eq!(ips.len(), 30, "every pod its own address");

        // Deleted pods free their node and address; replacements and status writes keep the index.
        let names: Vec<String> = st.iter_ns(ids::pods(), "default").take(10).filter_map(|p| s(p, "/metadata/name")).map(str::to_string).collect();
        for name in &names {
            st.delete(ids::pods(), "default", name, DeleteOptions::default()).expect("delete");
            st.reconcile();
            placement_matches_the_pods(&st);
        }
        let pod = names.last().cloned().unwrap_or_default();
        let any = st.iter_ns(ids::pods(), "default").filter_map(|p| s(p, "/metadata/name")).next().map(str::to_string).unwrap_or(pod);
        st.update_pod("default", &any, &super::super::PodUpdate { ready: Some(false), ..Default::default() }).expect("status");
        st.reconcile();
        placement_matches_the_pods(&st);
        assert_eq!(st.objects[ids::pods()].values().filter(|p| !terminating(p)).count(), 30);
    }

    #[test]
    fn a_ready_condition_keeps_its_transition_time_until_its_status_changes() {
        let mut st = seeded(3);
        web(&mut st, 0..1);
        let pod = pod_name(0);
        let ready_since = |st: &Store| {
            let p = st.get(ids::pods(), "default", &pod).expect("pod");
            let cs = p["status"]["conditions"].as_array().cloned().unwrap_or_default();
            let ready = cs.into_iter().find(|c| c["type"] == "Ready").expect("a Ready condition");
            (ready["status"].as_str().map(str::to_string), ready["lastTransitionTime"].clone())
        };
        let mut first = ready_since(&st);
        first.1 = json!("2020-01-01T00:00:00Z");
        // An old transition, so that a new one could not have the same second.
        let mut p = st.get(ids::pods(), "default", &pod).expect("pod");
        for c in p["status"]["conditions"].as_array_mut().into_iter().flatten() {
            c["lastTransitionTime"] = first.1.clone();
        }
        st.update(ids::pods(), "default", &pod, p, Sub::Status).expect("status");
        let rv = |st: &Store| st.get(ids::pods(), "default", &pod).expect("pod")["metadata"]["resourceVersion"].clone();
        let before = rv(&st);
        st.update_pod("default", &pod, &super::super::PodUpdate { ready: Some(true), ..Default::default() }).expect("update");
        assert_eq!(ready_since(&st), first, "still Ready: the same transition");
        assert_eq!(rv(&st), before, "nothing changed: nothing written");

        st.update_pod("default", &pod, &super::super::PodUpdate { restarted: true, ..Default::default() }).expect("restart");
        let p = st.get(ids::pods(), "default", &pod).expect("pod");
        assert_eq!(p["status"]["containerStatuses"][0]["restartCount"], 1);
        assert_eq!(ready_since(&st), first, "a restart is not a readiness change");
        assert_ne!(rv(&st), before, "a status write");

        st.update_pod("default", &pod, &super::super::PodUpdate { ready: Some(false), ..Default::default() }).expect("flip");
        let flipped = ready_since(&st);
        assert_eq!(flipped.0.as_deref(), Some("False"));
        assert_ne!(flipped.1, first.1, "a new transition");
    }
}
