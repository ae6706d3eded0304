//! The object store: objects as JSON per kind, one global resourceVersion
//! counter (as etcd's revision), and a bounded event log that watches read from.
//!
//! Every operation runs under one lock, and the built-in controllers
//! (`controllers.rs`) run to a fixed point at the end of each external write, so
//! a client sees their effects in the events that follow its own — except the
//! EndpointSlice controller's, which are written later, from the timers
//! (`Config::endpoint_slice_delay`), as a real one's are.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value, json};

use super::error::ApiError;
use super::resources::{KINDS, KindId, ResourceKind, ids};
use super::selector::{FieldSelector, LabelSelector};
use super::validation::Directive;
use super::{Config, events, patch, schema, service_validation, ssa, table, validation};

/// `(namespace, name)`; the namespace is empty for cluster-scoped kinds.
pub(crate) type Key = (String, String);

/// A watch event's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// `ADDED`.
    Added,
    /// `MODIFIED`.
    Modified,
    /// `DELETED`.
    Deleted,
}

impl EventType {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

/// One change, as the log keeps it: the object after the change (the last state
/// for a deletion) and before it, so that selector-filtered watches can turn a
/// label change into ADDED or DELETED as the real server does.
#[derive(Debug, Clone)]
pub(crate) struct LogEvent {
    pub rv: u64,
    pub kind: KindId,
    pub namespace: String,
    pub etype: EventType,
    pub obj: Arc<Value>,
    pub prev: Option<Arc<Value>>,
}

/// Which objects a list or watch is about.
#[derive(Debug, Clone)]
pub(crate) struct Filter {
    pub kind: KindId,
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Filter {
    pub fn matches(&self, ns: &str, obj: &Value) -> bool {
        self.namespace.as_deref().is_none_or(|n| n == ns) && self.labels.matches(obj) && self.fields.matches(obj)
    }
}

/// The answer to a watch from a resourceVersion older than the log keeps.
#[derive(Debug)]
pub(crate) struct Gone;

/// Options of a delete.
#[derive(Debug, Clone, Default)]
pub(crate) struct DeleteOptions {
    /// `Orphan` keeps dependents (their owner reference is removed).
    pub orphan: bool,
    /// `gracePeriodSeconds`; for pods, how long they stay terminating.
    pub grace: Option<Grace>,
    /// `preconditions.uid`.
    pub uid: Option<String>,
    /// `preconditions.resourceVersion`.
    pub resource_version: Option<String>,
}

/// How long a deleted pod stays terminating before the emulated kubelet
/// confirms its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grace {
    /// Gone at once (`gracePeriodSeconds: 0`).
    Immediate,
    /// Terminating for this long.
    For(Duration),
    /// Terminating until [`Handle::finish_pod_termination`](super::Handle::finish_pod_termination).
    UntilFinished,
}

/// Which part of an object a write addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sub {
    Main,
    Status,
}

/// The field manager of a request and whether its apply is forced.
#[derive(Debug, Clone)]
pub(crate) struct RequestWriter {
    /// `fieldManager`, else the user agent up to its first `/`.
    pub manager: String,
    /// `force=true` on an apply.
    pub force: bool,
}

/// A pod whose termination the emulated kubelet confirms at `due`.
#[derive(Debug, Clone)]
pub(crate) struct Timer {
    pub due: tokio::time::Instant,
    pub key: Key,
    pub uid: String,
}

pub(crate) struct Store {
    pub cfg: Config,
    pub rv: u64,
    pub objects: Vec<BTreeMap<Key, Value>>,
    uids: HashMap<String, (KindId, Key)>,
    pub log: VecDeque<LogEvent>,
    /// Watches from a resourceVersion below this get 410: the log holds every
    /// event after it.
    pub floor: u64,
    pub timers: Vec<Timer>,
    /// Terminating namespaces the emulated namespace controller empties and
    /// removes at the time given.
    pub namespace_timers: Vec<(tokio::time::Instant, String)>,
    /// The EndpointSlice controller's pending syncs and random choices.
    pub slice_sync: super::controllers::SliceSync,
    /// Namespaces whose pods, services or deployments changed since the
    /// controllers last ran.
    pub dirty: BTreeSet<String>,
    /// Objects written with owner references of which no owner exists: the
    /// garbage collector deletes them (as it does when an owner is deleted
    /// first and a controller still writes its dependent).
    pub orphans: BTreeSet<(KindId, Key)>,
    pub nodes_changed: bool,
    /// Pod addresses and pods per node, kept with every pod write.
    pub pod_placement: PodPlacement,
    pub next_pod_ip: u32,
    pub next_service_ip: u32,
    /// The IPv6 ClusterIP allocator's counter, apart so that IPv4 addresses
    /// come as they do on a single-stack cluster.
    pub next_service_ip6: u64,
    pub next_node_port: u16,
    rng: u64,
    changed: tokio::sync::watch::Sender<u64>,
    /// The `fieldValidation` of the request being served: the HTTP layer sets
    /// it around one write (never around the built-in controllers' writes).
    pub validation: Option<Directive>,
    /// Who makes the request being served, for managedFields (the HTTP layer
    /// sets it around one write; the built-in controllers' writes record none).
    pub writer: Option<RequestWriter>,
    /// Warnings for the request being served (`Warning` headers).
    pub warnings: Vec<String>,
}

/// Now, as Kubernetes timestamps are written.
pub(crate) fn now() -> String {
    k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// Now plus `d`, as a Kubernetes timestamp.
pub(crate) fn now_plus(d: Duration) -> String {
    let ts = k8s_openapi::jiff::Timestamp::now();
    let later = k8s_openapi::jiff::SignedDuration::try_from(d).ok().and_then(|d| ts.checked_add(d).ok()).unwrap_or(ts);
    later.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// Which pod addresses are taken and how many pods each node runs: the
/// scheduler and the pod address allocator asked every pod whenever one
/// started, which made loading N pods cost N² (50,000 pods: over 20 minutes).
#[derive(Debug, Default)]
pub(crate) struct PodPlacement {
    ips: HashMap<String, usize>,
    per_node: HashMap<String, usize>,
}

impl PodPlacement {
    fn count(map: &mut HashMap<String, usize>, key: Option<&str>, add: bool) {
        let Some(key) = key else { return };
        if add {
            *map.entry(key.to_string()).or_default() += 1;
        } else if let Some(n) = map.get_mut(key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(key);
            }
        }
    }

    fn note(&mut self, pod: &Value, add: bool) {
        Self::count(&mut self.ips, pod.pointer("/status/podIP").and_then(Value::as_str), add);
        Self::count(&mut self.per_node, pod.pointer("/spec/nodeName").and_then(Value::as_str), add);
    }

    /// How many pods have `ip` as their `status.podIP`.
    pub fn pods_with_ip(&self, ip: &str) -> usize {
        self.ips.get(ip).copied().unwrap_or(0)
    }

    /// How many pods are bound to `node`.
    pub fn pods_on(&self, node: &str) -> usize {
        self.per_node.get(node).copied().unwrap_or(0)
    }
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata").and_then(|m| m.get(field)).and_then(Value::as_str)
}

fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    match obj.get_mut("metadata") {
        Some(Value::Object(m)) => m,
        // Just made an object above.
        _ => unreachable!("metadata is an object"),
    }
}

/// Everything but metadata and status: a change here bumps `metadata.generation`.
fn spec_part(obj: &Value) -> Map<String, Value> {
    obj.as_object()
        .map(|m| {
            m.iter()
                .filter(|(k, _)| !matches!(k.as_str(), "metadata" | "status" | "apiVersion" | "kind"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default()
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

impl Store {
    pub fn new(cfg: Config, changed: tokio::sync::watch::Sender<u64>) -> Self {
        let seed = cfg.seed.map(super::controllers::name_seed).unwrap_or_else(|| {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
            h.finish() | 1
        });
        let slice_sync = super::controllers::SliceSync::new(cfg.seed);
        let next_node_port = *cfg.node_port_range.start();
        let mut s = Self {
            cfg,
            rv: 1,
            objects: vec![BTreeMap::new(); KINDS.len()],
            uids: HashMap::new(),
            log: VecDeque::new(),
            floor: 0,
            timers: Vec::new(),
            namespace_timers: Vec::new(),
            slice_sync,
            dirty: BTreeSet::new(),
            orphans: BTreeSet::new(),
            nodes_changed: false,
            pod_placement: PodPlacement::default(),
            next_pod_ip: 0,
            next_service_ip: 0,
            next_service_ip6: 0,
            next_node_port,
            rng: seed,
            changed,
            validation: None,
            writer: None,
            warnings: Vec::new(),
        };
        for ns in s.cfg.namespaces.clone() {
            let obj = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
            if let Err(e) = s.create(ids::namespaces(), "", obj) {
                tracing::warn!(error = %e, "could not create a configured namespace");
            }
        }
        for doc in s.cfg.crds.iter().flat_map(|crds| super::yaml_documents(crds)).collect::<Vec<_>>() {
            let created = serde_saphyr::from_str::<Value>(&doc)
                .map_err(|e| ApiError::bad_request(format!("a configured CRD is not YAML: {e}")))
                .and_then(|crd| s.create(ids::crds(), "", crd));
            if let Err(e) = created {
                tracing::warn!(error = %e, "could not create a configured CRD");
            }
        }
        for n in s.cfg.nodes.clone() {
            if let Err(e) = s.create_node(&n) {
                tracing::warn!(error = %e, "could not create a configured node");
            }
        }
        s
    }

    /// A pseudo-random u64 (xorshift): names and uids need uniqueness, not secrecy.
    pub fn random(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }

    /// Five characters from the alphabet Kubernetes uses for generated names.
    pub fn random_suffix(&mut self) -> String {
        const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
        let mut r = self.random();
        (0..5)
            .map(|_| {
                let c = ALPHABET[(r % ALPHABET.len() as u64) as usize] as char;
                r /= ALPHABET.len() as u64;
                c
            })
            .collect()
    }

    fn new_uid(&mut self) -> String {
        let (a, b) = (self.random(), self.random());
        let h = format!("{a:016x}{b:016x}");
        format!("{}-{}-4{}-a{}-{}", &h[0..8], &h[8..12], &h[13..16], &h[17..20], &h[20..32])
    }

    pub fn get_obj(&self, kind: KindId, key: &Key) -> Option<&Value> {
        self.objects.get(kind)?.get(key)
    }


    /// Stores an object as it is (no resourceVersion, no event), keeping
    /// the pod placement index; every write to `objects` goes through here
    /// or `take_object`.
    fn set_object(&mut self, kind: KindId, key: Key, obj: Value) -> Option<Value> {
        if kind == ids::pods() {
            self.pod_placement.note(&obj, true);
        }
        let prev = self.objects[kind].insert(key, obj);
        if kind == ids::pods()
            && let Some(p) = &prev
        {
            self.pod_placement.note(p, false);
        }
        prev
    }

    fn take_object(&mut self, kind: KindId, key: &Key) -> Option<Value> {
        let obj = self.objects[kind].remove(key)?;
        if kind == ids::pods() {
            self.pod_placement.note(&obj, false);
        }
        Some(obj)
    }

    fn key_for(kind: KindId, ns: &str, name: &str) -> Key {
        if KINDS[kind].namespaced { (ns.to_string(), name.to_string()) } else { (String::new(), name.to_string()) }
    }

    fn mark_dirty(&mut self, kind: KindId, ns: &str) {
        if kind == ids::nodes() {
            self.nodes_changed = true;
        } else if [ids::pods(), ids::services(), ids::deployments(), ids::daemonsets()].contains(&kind) {
            self.dirty.insert(ns.to_string());
        }
    }

    /// Stores `obj` under a new resourceVersion and logs the change.
    pub fn put(&mut self, kind: KindId, mut obj: Value, etype: EventType) -> Value {
        self.rv += 1;
        meta_mut(&mut obj).insert("resourceVersion".into(), json!(self.rv.to_string()));
        let ns = meta_str(&obj, "namespace").unwrap_or_default().to_string();
        let name = meta_str(&obj, "name").unwrap_or_default().to_string();
        let key = Self::key_for(kind, &ns, &name);
        if let Some(uid) = meta_str(&obj, "uid") {
            self.uids.insert(uid.to_string(), (kind, key.clone()));
        }
        if let Some(refs) = obj.pointer("/metadata/ownerReferences").and_then(Value::as_array)
            && !refs.is_empty()
            && !refs.iter().any(|r| r.get("uid").and_then(Value::as_str).is_some_and(|u| self.uids.contains_key(u)))
        {
            self.orphans.insert((kind, key.clone()));
        }
        let prev = self.set_object(kind, key.clone(), obj.clone());
        self.log_event(kind, &ns, etype, obj.clone(), prev);
        self.mark_dirty(kind, &ns);
        if let Some((twin, convert)) = twin_of(kind) {
            let mut t = convert(&obj);
            self.rv += 1;
            meta_mut(&mut t).insert("resourceVersion".into(), json!(self.rv.to_string()));
            let prev = self.set_object(twin, key, t.clone());
            let etype = if prev.is_some() { EventType::Modified } else { EventType::Added };
            self.log_event(twin, &ns, etype, t, prev);
        }
        obj
    }

    fn log_event(&mut self, kind: KindId, ns: &str, etype: EventType, obj: Value, prev: Option<Value>) {
        self.log.push_back(LogEvent {
            rv: self.rv,
            kind,
            namespace: ns.to_string(),
            etype,
            obj: Arc::new(obj),
            prev: prev.map(Arc::new),
        });
        while self.log.len() > self.cfg.max_events {
            if let Some(e) = self.log.pop_front() {
                self.floor = e.rv;
            }
        }
        self.changed.send_replace(self.rv);
    }

    /// Removes an object for good (a `DELETED` event under a new
    /// resourceVersion), then collects its dependents.
    pub fn remove(&mut self, kind: KindId, key: &Key) -> Option<Value> {
        let mut obj = self.take_object(kind, key)?;
        self.rv += 1;
        meta_mut(&mut obj).insert("resourceVersion".into(), json!(self.rv.to_string()));
        let uid = meta_str(&obj, "uid").unwrap_or_default().to_string();
        self.uids.remove(&uid);
        self.log_event(kind, &key.0, EventType::Deleted, obj.clone(), Some(obj.clone()));
        self.mark_dirty(kind, &key.0);
        if let Some((twin, _)) = twin_of(kind)
            && let Some(mut t) = self.take_object(twin, key)
        {
            self.rv += 1;
            meta_mut(&mut t).insert("resourceVersion".into(), json!(self.rv.to_string()));
            self.log_event(twin, &key.0, EventType::Deleted, t.clone(), Some(t));
        }
        self.collect_dependents(&uid);
        if kind == ids::namespaces() {
            self.empty_namespace(&key.1);
        }
        if kind == ids::crds() {
            self.delete_custom_resources(&obj);
        }
        Some(obj)
    }

    /// A CRD that goes takes every object of the kind it defines with it (the
    /// real server deletes them first, under the CRD's
    /// `customresourcecleanup.apiextensions.k8s.io` finalizer; here they go
    /// at once, finalizers or not). Their dependents are collected. The kind
    /// itself stays served: this server's kinds are fixed.
    fn delete_custom_resources(&mut self, crd: &Value) {
        let group = crd.pointer("/spec/group").and_then(Value::as_str).unwrap_or_default();
        let plural = crd.pointer("/spec/names/plural").and_then(Value::as_str).unwrap_or_default();
        for kind in 0..KINDS.len() {
            if KINDS[kind].group != group || KINDS[kind].plural != plural {
                continue;
            }
            let keys: Vec<Key> = self.objects[kind].keys().cloned().collect();
            for key in keys {
                self.remove(kind, &key);
            }
        }
    }

    /// Owner-reference garbage collection: a dependent none of whose owners
    /// exists any more is deleted (background propagation).
    fn collect_dependents(&mut self, owner_uid: &str) {
        let mut doomed = Vec::new();
        for (kind, objs) in self.objects.iter().enumerate() {
            for (key, obj) in objs {
                let Some(refs) = obj.pointer("/metadata/ownerReferences").and_then(Value::as_array) else { continue };
                let owned = refs.iter().any(|r| r.get("uid").and_then(Value::as_str) == Some(owner_uid));
                let other_alive = refs.iter().any(|r| {
                    r.get("uid").and_then(Value::as_str).is_some_and(|u| u != owner_uid && self.uids.contains_key(u))
                });
                if owned && !other_alive {
                    doomed.push((kind, key.clone()));
                }
            }
        }
        for (kind, key) in doomed {
            if let Err(e) = self.delete(kind, &key.0, &key.1, DeleteOptions::default()) {
                tracing::debug!(error = %e, "garbage collection of a dependent");
            }
        }
    }

    /// Deletes what was written with only owners that do not exist.
    pub fn collect_orphans(&mut self) {
        for (kind, key) in std::mem::take(&mut self.orphans) {
            let still_orphan = self.objects[kind].get(&key).is_some_and(|obj| {
                obj.pointer("/metadata/ownerReferences").and_then(Value::as_array).is_some_and(|refs| {
                    !refs.iter().any(|r| r.get("uid").and_then(Value::as_str).is_some_and(|u| self.uids.contains_key(u)))
                })
            });
            if still_orphan && let Err(e) = self.delete(kind, &key.0, &key.1, DeleteOptions::default()) {
                tracing::debug!(error = %e, "garbage collection of an orphan");
            }
        }
    }

    /// Deletes everything in a namespace that is going away.
    fn empty_namespace(&mut self, ns: &str) {
        for kind in 0..KINDS.len() {
            if !KINDS[kind].namespaced {
                continue;
            }
            let keys: Vec<Key> = self.objects[kind].keys().filter(|k| k.0 == ns).cloned().collect();
            for key in keys {
                if let Some(obj) = self.objects[kind].get_mut(&key) {
                    // The namespace is gone: nothing can remove finalizers any more.
                    meta_mut(obj).remove("finalizers");
                }
                self.remove(kind, &key);
            }
        }
    }

    fn ensure_namespace(&self, kind: &ResourceKind, ns: &str) -> Result<(), ApiError> {
        if !kind.namespaced {
            return Ok(());
        }
        let key = (String::new(), ns.to_string());
        match self.objects[ids::namespaces()].get(&key) {
            None => Err(ApiError::not_found(&KINDS[ids::namespaces()], ns)),
            Some(n) if n.pointer("/metadata/deletionTimestamp").is_some() => Err(ApiError {
                code: 403,
                reason: "Forbidden",
                message: format!(
                    "{} \"{}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                    kind.qualified_plural(),
                    meta_str(n, "name").unwrap_or_default()
                ),
                details: None,
            }),
            Some(_) => Ok(()),
        }
    }

    // ---- reads ----

    pub fn get(&self, kind: KindId, ns: &str, name: &str) -> Result<Value, ApiError> {
        self.get_obj(kind, &Self::key_for(kind, ns, name)).cloned().ok_or_else(|| ApiError::not_found(&KINDS[kind], name))
    }

    /// Lists matching objects in key order, from `start` (exclusive), at most
    /// `limit`. Returns the page and the key to continue after, if more match.
    pub fn list(&self, f: &Filter, after: Option<&Key>, limit: Option<usize>) -> (Vec<Value>, Option<Key>, usize) {
        let objs = &self.objects[f.kind];
        let iter: Box<dyn Iterator<Item = (&Key, &Value)>> = match after {
            Some(k) => Box::new(objs.range((std::ops::Bound::Excluded(k.clone()), std::ops::Bound::Unbounded))),
            None => Box::new(objs.iter()),
        };
        let mut out = Vec::new();
        let mut last = None;
        let mut remaining = 0usize;
        for (k, v) in iter {
            if !f.matches(&k.0, v) {
                continue;
            }
            if limit.is_some_and(|l| out.len() >= l) {
                remaining += 1;
                continue;
            }
            out.push(v.clone());
            last = Some(k.clone());
        }
        let next = if remaining > 0 { last } else { None };
        (out, next, remaining)
    }

    /// The events after `after` that a watch with this filter sees, with
    /// selector transitions turned into ADDED/DELETED.
    pub fn events_since(&self, f: &Filter, after: u64) -> Result<Vec<(EventType, Arc<Value>)>, Gone> {
        if after < self.floor {
            return Err(Gone);
        }
        let start = self.log.partition_point(|e| e.rv <= after);
        let mut out = Vec::new();
        for e in self.log.range(start..) {
            if e.kind != f.kind {
                continue;
            }
            let now = f.matches(&e.namespace, &e.obj);
            let before = e.prev.as_ref().is_some_and(|p| f.matches(&e.namespace, p));
            let t = match e.etype {
                EventType::Added if now => EventType::Added,
                EventType::Modified if now && before => EventType::Modified,
                EventType::Modified if now => EventType::Added,
                EventType::Modified if before => EventType::Deleted,
                EventType::Deleted if now => EventType::Deleted,
                _ => continue,
            };
            out.push((t, e.obj.clone()));
        }
        Ok(out)
    }

    /// Declares every resourceVersion issued so far too old: the next watch from
    /// any of them gets 410. Bumps the revision so new lists return a valid one.
    pub fn expire(&mut self) {
        self.rv += 1;
        self.floor = self.rv;
        self.log.clear();
        self.changed.send_replace(self.rv);
    }

    // ---- writes ----

    /// Creates an object (POST). Fills name from generateName, uid,
    /// creationTimestamp, generation; resets status where the real server does.
    pub fn create(&mut self, kind: KindId, ns: &str, mut obj: Value) -> Result<Value, ApiError> {
        let rk = &KINDS[kind];
        if !obj.is_object() {
            return Err(ApiError::bad_request("the body of the request is not an object"));
        }
        obj["apiVersion"] = json!(rk.api_version());
        obj["kind"] = json!(rk.kind);
        let body_ns = meta_str(&obj, "namespace").map(str::to_string);
        if rk.namespaced {
            if let Some(b) = body_ns.as_deref()
                && !b.is_empty()
                && b != ns
            {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            meta_mut(&mut obj).insert("namespace".into(), json!(ns));
        } else {
            meta_mut(&mut obj).remove("namespace");
        }
        let mut name = meta_str(&obj, "name").unwrap_or_default().to_string();
        if name.is_empty() {
            let Some(prefix) = meta_str(&obj, "generateName").map(str::to_string) else {
                return Err(ApiError::invalid(rk, "", "metadata.name: Required value: name or generateName is required"));
            };
            name = format!("{prefix}{}", self.random_suffix());
            meta_mut(&mut obj).insert("name".into(), json!(name));
        }
        if !valid_name(&name) {
            return Err(ApiError::invalid(
                rk,
                &name,
                &format!("metadata.name: Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"),
            ));
        }
        self.ensure_namespace(rk, ns)?;
        let key = Self::key_for(kind, ns, &name);
        if self.objects[kind].contains_key(&key) {
            return Err(ApiError::already_exists(rk, &name));
        }
        let uid = self.new_uid();
        {
            let m = meta_mut(&mut obj);
            for f in ["resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds", "selfLink"] {
                m.remove(f);
            }
            m.insert("uid".into(), json!(uid));
            m.insert("creationTimestamp".into(), json!(now()));
            m.insert("generation".into(), json!(1));
        }
        let request = obj.clone();
        self.prepare(kind, &mut obj, None)?;
        self.record_update(kind, None, &request, &mut obj, Sub::Main);
        Ok(self.put(kind, obj, EventType::Added))
    }

    /// Replaces an object (PUT), or its status (PUT …/status).
    pub fn update(&mut self, kind: KindId, ns: &str, name: &str, mut new: Value, sub: Sub) -> Result<Value, ApiError> {
        let rk = &KINDS[kind];
        let key = Self::key_for(kind, ns, name);
        let Some(old) = self.objects[kind].get(&key).cloned() else {
            return Err(ApiError::not_found(rk, name));
        };
        if !new.is_object() {
            return Err(ApiError::bad_request("the body of the request is not an object"));
        }
        if let Some(n) = meta_str(&new, "name")
            && n != name
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({n}) does not match the name on the URL ({name})"
            )));
        }
        if let Some(rv) = meta_str(&new, "resourceVersion")
            && !rv.is_empty()
            && Some(rv) != meta_str(&old, "resourceVersion")
        {
            return Err(ApiError::conflict(
                rk,
                name,
                "the object has been modified; please apply your changes to the latest version and try again",
            ));
        }
        let mut next = match sub {
            Sub::Status => {
                let mut n = old.clone();
                match new.get("status") {
                    Some(s) => n["status"] = s.clone(),
                    None => {
                        if let Some(m) = n.as_object_mut() {
                            m.remove("status");
                        }
                    }
                }
                if let Some(mf) = new.pointer("/metadata/managedFields") {
                    meta_mut(&mut n).insert("managedFields".into(), mf.clone());
                }
                n
            }
            Sub::Main => {
                if rk.status {
                    match old.get("status") {
                        Some(s) => new["status"] = s.clone(),
                        None => {
                            if let Some(m) = new.as_object_mut() {
                                m.remove("status");
                            }
                        }
                    }
                }
                let old_meta = old.get("metadata").cloned().unwrap_or_else(|| json!({}));
                let m = meta_mut(&mut new);
                for f in ["uid", "creationTimestamp", "name", "namespace", "generation", "deletionTimestamp", "deletionGracePeriodSeconds"] {
                    match old_meta.get(f) {
                        Some(v) => m.insert(f.into(), v.clone()),
                        None => m.remove(f),
                    };
                }
                if !m.contains_key("managedFields")
                    && let Some(mf) = old_meta.get("managedFields")
                {
                    m.insert("managedFields".into(), mf.clone());
                }
                new
            }
        };
        next["apiVersion"] = json!(rk.api_version());
        next["kind"] = json!(rk.kind);
        let request = next.clone();
        self.prepare(kind, &mut next, Some(&old))?;
        self.record_update(kind, Some(&old), &request, &mut next, sub);
        if spec_part(&next) != spec_part(&old) {
            let g = old.pointer("/metadata/generation").and_then(Value::as_i64).unwrap_or(1);
            meta_mut(&mut next).insert("generation".into(), json!(g + 1));
        }
        let mut a = next.clone();
        meta_mut(&mut a).remove("resourceVersion");
        let mut b = old.clone();
        meta_mut(&mut b).remove("resourceVersion");
        if a == b {
            // A no-op write does not bump the resourceVersion, as on a real server.
            return Ok(old);
        }
        if self.deletion_due(kind, &next) {
            self.set_object(kind, key.clone(), next);
            return Ok(self.remove(kind, &key).unwrap_or(old));
        }
        Ok(self.put(kind, next, EventType::Modified))
    }

    /// Whether an object marked for deletion can go now: no finalizers left and,
    /// for a pod, its grace period confirmed over.
    fn deletion_due(&self, kind: KindId, obj: &Value) -> bool {
        if obj.pointer("/metadata/deletionTimestamp").is_none() {
            return false;
        }
        let finalizers = obj.pointer("/metadata/finalizers").and_then(Value::as_array).is_some_and(|f| !f.is_empty())
            || (kind == ids::namespaces() && obj.pointer("/spec/finalizers").and_then(Value::as_array).is_some_and(|f| !f.is_empty()));
        let grace_over = kind != ids::pods()
            || obj.pointer("/metadata/deletionGracePeriodSeconds").and_then(Value::as_i64).unwrap_or(0) == 0;
        !finalizers && grace_over
    }

    /// Patches an object. `content_type` selects merge, strategic merge, JSON
    /// patch or server-side apply. Apply creates a missing object.
    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &mut self,
        kind: KindId,
        ns: &str,
        name: &str,
        content_type: &str,
        body: &[u8],
        sub: Sub,
        field_manager: Option<&str>,
    ) -> Result<(Value, bool), ApiError> {
        let rk = &KINDS[kind];
        let ct = content_type.split(';').next().unwrap_or_default().trim();
        if ct == "application/apply-patch+yaml" {
            let applied: Value = serde_saphyr::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?;
            let Some(manager) = field_manager.filter(|m| !m.is_empty()) else {
                return Err(ApiError::invalid(rk, name, "fieldManager: Required value: is required for apply patch"));
            };
            return self.apply(kind, ns, name, applied, manager, sub);
        }
        let key = Self::key_for(kind, ns, name);
        let Some(old) = self.objects[kind].get(&key).cloned() else {
            return Err(ApiError::not_found(rk, name));
        };
        let mut next = old.clone();
        match ct {
            "application/merge-patch+json" | "application/json" => {
                let p: Value = parse_json(body)?;
                patch::merge_patch(&mut next, &p);
            }
            "application/strategic-merge-patch+json" => {
                if !super::resources::strategic_merge_patch(kind) {
                    return Err(ApiError::unsupported_media_type(ct));
                }
                let p: Value = parse_json(body)?;
                patch::strategic_merge_patch(&mut next, &p);
            }
            "application/json-patch+json" => {
                let p: json_patch::Patch = serde_json::from_slice(body)
                    .map_err(|e| ApiError::bad_request(format!("error decoding JSON patch: {e}")))?;
                json_patch::patch(&mut next, &p)
                    .map_err(|e| ApiError { code: 422, reason: "Invalid", message: e.to_string(), details: None })?;
            }
            other => return Err(ApiError::unsupported_media_type(other)),
        }
        // A resourceVersion in the patch is a precondition; otherwise the patch
        // applies to the latest version.
        let patched_rv = meta_str(&next, "resourceVersion").map(str::to_string);
        if patched_rv.as_deref() != meta_str(&old, "resourceVersion") {
            return Err(ApiError::conflict(
                rk,
                name,
                "the object has been modified; please apply your changes to the latest version and try again",
            ));
        }
        Ok((self.update(kind, ns, name, next, sub)?, false))
    }

    /// Server-side apply (see [`ssa`]): merges `applied` into the object by
    /// the schema's list and map types, removes what this manager applied
    /// before and no longer does, and answers 409 for fields another manager
    /// owns unless the request forces. Creates a missing object.
    fn apply(
        &mut self,
        kind: KindId,
        ns: &str,
        name: &str,
        mut applied: Value,
        manager: &str,
        sub: Sub,
    ) -> Result<(Value, bool), ApiError> {
        let rk = &KINDS[kind];
        if applied.get("apiVersion").and_then(Value::as_str) != Some(&rk.api_version())
            || applied.get("kind").and_then(Value::as_str) != Some(rk.kind)
        {
            return Err(ApiError::bad_request(format!(
                "the apiVersion/kind of the applied object must be {}/{}",
                rk.api_version(),
                rk.kind
            )));
        }
        match meta_str(&applied, "name") {
            // The real server takes the name from the URL when the body has none.
            None => {
                meta_mut(&mut applied).insert("name".into(), json!(name));
            }
            Some(n) if n != name => {
                return Err(ApiError::bad_request("the name of the applied object does not match the name on the URL"));
            }
            Some(_) => {}
        }
        if let Some(m) = applied.as_object_mut() {
            match sub {
                Sub::Status => m.retain(|k, _| matches!(k.as_str(), "apiVersion" | "kind" | "metadata" | "status")),
                Sub::Main if rk.status => {
                    m.remove("status");
                }
                Sub::Main => {}
            }
        }
        {
            let m = meta_mut(&mut applied);
            if sub == Sub::Status {
                m.retain(|k, _| matches!(k.as_str(), "name" | "namespace"));
            }
            for f in ["uid", "creationTimestamp", "generation", "managedFields", "deletionTimestamp", "deletionGracePeriodSeconds", "selfLink"] {
                m.remove(f);
            }
        }
        let precondition = meta_str(&applied, "resourceVersion").map(str::to_string);
        meta_mut(&mut applied).remove("resourceVersion");
        let key = Self::key_for(kind, ns, name);
        let old = self.objects[kind].get(&key).cloned();
        if old.is_none() && sub == Sub::Status {
            return Err(ApiError::not_found(rk, name));
        }
        if let (Some(rv), Some(old)) = (&precondition, &old)
            && Some(rv.as_str()) != meta_str(old, "resourceVersion")
        {
            return Err(ApiError::conflict(rk, name, "the object has been modified; please apply your changes to the latest version and try again"));
        }
        let force = self.writer.as_ref().is_some_and(|w| w.force);
        let api_version = rk.api_version();
        let writer = ssa::Writer { manager, subresource: if sub == Sub::Status { "status" } else { "" }, api_version: &api_version, time: now() };
        let next = ssa::apply(old.as_ref(), &applied, &ssa::Node::root(rk.kind, self.schema_of(kind)), &writer, force)?;
        // The apply's managedFields are final: the write below records no Update.
        let request_writer = self.writer.take();
        let result = match old {
            None => self.create(kind, ns, next).map(|o| (o, true)),
            Some(_) => self.update(kind, ns, name, next, sub).map(|o| (o, false)),
        };
        self.writer = request_writer;
        result
    }

    /// Records a non-apply write's changes in managedFields for the request's
    /// manager (see [`ssa::record_update`]).
    fn record_update(&self, kind: KindId, old: Option<&Value>, request: &Value, new: &mut Value, sub: Sub) {
        let Some(w) = &self.writer else { return };
        let rk = &KINDS[kind];
        let node = ssa::Node::root(rk.kind, self.schema_of(kind));
        let api_version = rk.api_version();
        let writer = ssa::Writer { manager: &w.manager, subresource: if sub == Sub::Status { "status" } else { "" }, api_version: &api_version, time: now() };
        let allocated = ssa::allocated_fields(rk.kind, request, new, &node);
        ssa::record_update(old, new, &node, &writer, &allocated);
    }

    /// Deletes an object: marks it (deletionTimestamp) while finalizers or a
    /// pod's grace period hold it, else removes it and collects its dependents.
    pub fn delete(&mut self, kind: KindId, ns: &str, name: &str, opts: DeleteOptions) -> Result<Value, ApiError> {
        let rk = &KINDS[kind];
        let key = Self::key_for(kind, ns, name);
        let Some(old) = self.objects[kind].get(&key).cloned() else {
            return Err(ApiError::not_found(rk, name));
        };
        if let Some(uid) = &opts.uid
            && Some(uid.as_str()) != meta_str(&old, "uid")
        {
            return Err(ApiError::conflict(rk, name, &format!("Precondition failed: UID in precondition: {uid}, UID in object meta: {}", meta_str(&old, "uid").unwrap_or_default())));
        }
        if let Some(rv) = &opts.resource_version
            && Some(rv.as_str()) != meta_str(&old, "resourceVersion")
        {
            return Err(ApiError::conflict(rk, name, &format!("Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}", meta_str(&old, "resourceVersion").unwrap_or_default())));
        }
        let uid = meta_str(&old, "uid").unwrap_or_default().to_string();
        if opts.orphan {
            self.orphan_dependents(&uid);
        }
        let mut next = old.clone();
        let already = old.pointer("/metadata/deletionTimestamp").is_some();
        if kind == ids::pods() && !already {
            let scheduled = old.pointer("/spec/nodeName").and_then(Value::as_str).is_some_and(|n| !n.is_empty());
            let grace = if scheduled { opts.grace.unwrap_or(self.cfg.pod_grace) } else { Grace::Immediate };
            let (ts, secs) = match grace {
                Grace::Immediate => (now(), 0),
                Grace::For(d) => (now_plus(d), d.as_secs().max(1) as i64),
                Grace::UntilFinished => (now_plus(Duration::from_secs(30)), 30),
            };
            let m = meta_mut(&mut next);
            m.insert("deletionTimestamp".into(), json!(ts));
            m.insert("deletionGracePeriodSeconds".into(), json!(secs));
            if let Grace::For(d) = grace {
                self.timers.push(Timer { due: tokio::time::Instant::now() + d, key: key.clone(), uid: uid.clone() });
            }
        } else if kind == ids::pods() && opts.grace == Some(Grace::Immediate) {
            meta_mut(&mut next).insert("deletionGracePeriodSeconds".into(), json!(0));
        } else if !already {
            let m = meta_mut(&mut next);
            m.insert("deletionTimestamp".into(), json!(now()));
            m.insert("deletionGracePeriodSeconds".into(), json!(0));
        }
        if kind == ids::namespaces() {
            next["status"] = json!({"phase": "Terminating"});
            if !already && self.cfg.namespace_cleanup.is_zero() {
                let marked = self.put(kind, next, EventType::Modified);
                self.finish_namespace(&key.1);
                return Ok(marked);
            }
            if !already {
                self.namespace_timers.push((tokio::time::Instant::now() + self.cfg.namespace_cleanup, key.1.clone()));
            }
        }
        if self.deletion_due(kind, &next) {
            self.set_object(kind, key.clone(), next);
            return Ok(self.remove(kind, &key).unwrap_or(old));
        }
        if next == old {
            return Ok(old);
        }
        Ok(self.put(kind, next, EventType::Modified))
    }

    /// Removes the owner reference to `owner_uid` from every dependent.
    fn orphan_dependents(&mut self, owner_uid: &str) {
        let mut changed = Vec::new();
        for (kind, objs) in self.objects.iter().enumerate() {
            for (key, obj) in objs {
                let Some(refs) = obj.pointer("/metadata/ownerReferences").and_then(Value::as_array) else { continue };
                if refs.iter().any(|r| r.get("uid").and_then(Value::as_str) == Some(owner_uid)) {
                    let mut o = obj.clone();
                    let kept: Vec<Value> =
                        refs.iter().filter(|r| r.get("uid").and_then(Value::as_str) != Some(owner_uid)).cloned().collect();
                    meta_mut(&mut o).insert("ownerReferences".into(), Value::Array(kept));
                    changed.push((kind, key.clone(), o));
                }
            }
        }
        for (kind, _, o) in changed {
            self.put(kind, o, EventType::Modified);
        }
    }

    /// The emulated kubelet confirms a terminating pod is gone.
    pub fn finish_pod(&mut self, key: &Key, uid: Option<&str>) -> Result<(), ApiError> {
        let kind = ids::pods();
        let Some(pod) = self.objects[kind].get(key).cloned() else {
            return Err(ApiError::not_found(&KINDS[kind], &key.1));
        };
        if uid.is_some_and(|u| Some(u) != meta_str(&pod, "uid")) || pod.pointer("/metadata/deletionTimestamp").is_none() {
            return Ok(());
        }
        self.delete(kind, &key.0, &key.1, DeleteOptions { grace: Some(Grace::Immediate), ..Default::default() })?;
        Ok(())
    }

    /// The `openAPIV3Schema` of the stored CRD serving `kind`'s version, for
    /// a custom resource.
    fn schema_of(&self, kind: KindId) -> Option<&Value> {
        table::crd_for(self, kind)
            .and_then(|crd| table::crd_version(crd, KINDS[kind].version))
            .and_then(|v| v.pointer("/schema/openAPIV3Schema"))
    }

    /// A Service as the real server's strategy, defaults, validation and
    /// allocators take it (see [`service_validation`]).
    fn check_service(&self, obj: &mut Value, old: Option<&Value>) -> Result<(), ApiError> {
        service_validation::normalize(obj, old);
        let me = (meta_str(obj, "namespace").unwrap_or_default().to_string(), meta_str(obj, "name").unwrap_or_default().to_string());
        let errors = service_validation::init_families(obj, old, self.cfg.service_cidr_v6.is_some());
        if !errors.is_empty() {
            return Err(ApiError::invalid_fields(&KINDS[ids::services()], &me.1, &errors));
        }
        let others = self.objects[ids::services()].iter().filter(|(k, _)| **k != me).map(|(_, o)| o);
        let mut allocated = service_validation::Allocated {
            node_ports: BTreeSet::new(),
            cluster_ips: BTreeSet::new(),
            node_port_range: &self.cfg.node_port_range,
            service_cidr: self.cfg.service_cidr,
            service_cidr_v6: self.cfg.service_cidr_v6,
        };
        for o in others {
            let ips = service_validation::strings(o.pointer("/spec/clusterIPs"));
            allocated.cluster_ips.extend(ips.iter().filter_map(|ip| ip.parse::<std::net::IpAddr>().ok()));
            let ports = o.pointer("/spec/ports").and_then(Value::as_array).into_iter().flatten();
            allocated.node_ports.extend(ports.filter_map(|p| p.get("nodePort").and_then(Value::as_u64)).filter_map(|n| u16::try_from(n).ok()));
        }
        let errors = service_validation::validate(obj, old, &allocated);
        if errors.is_empty() {
            return Ok(());
        }
        Err(ApiError::invalid_fields(&KINDS[ids::services()], &me.1, &errors))
    }

    /// Field validation of `obj` (see [`validation`]): `Strict` refuses
    /// unknown fields, `Warn` returns them as warnings, `Ignore` checks nothing.
    pub fn check_fields(&self, kind: KindId, obj: &Value, directive: Directive) -> Result<Vec<String>, ApiError> {
        if directive == Directive::Ignore {
            return Ok(Vec::new());
        }
        let findings = validation::check(kind, obj, self.schema_of(kind));
        if directive == Directive::Strict {
            return findings.refusal(kind).map_or(Ok(Vec::new()), Err);
        }
        Ok(findings.warnings())
    }

    /// The namespace controller on a terminating namespace: everything in it
    /// goes, then its `kubernetes` finalizer, then (unless other finalizers
    /// hold it) the namespace.
    fn finish_namespace(&mut self, ns: &str) {
        let key = (String::new(), ns.to_string());
        let Some(mut n) = self.objects[ids::namespaces()].get(&key).cloned() else { return };
        if let Some(spec) = n.get_mut("spec").and_then(Value::as_object_mut) {
            spec.remove("finalizers");
        }
        self.set_object(ids::namespaces(), key.clone(), n.clone());
        self.empty_namespace(ns);
        if self.deletion_due(ids::namespaces(), &n) {
            self.remove(ids::namespaces(), &key);
        }
    }

    /// Whether a kubelet, namespace or EndpointSlice timer is pending.
    pub fn has_timers(&self) -> bool {
        !self.timers.is_empty() || !self.namespace_timers.is_empty() || self.slice_sync.is_pending()
    }

    /// Fires the kubelet, namespace-controller and EndpointSlice-controller
    /// timers that are due.
    pub fn fire_timers(&mut self) {
        let now = tokio::time::Instant::now();
        let (due, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.namespace_timers).into_iter().partition(|(t, _)| *t <= now);
        self.namespace_timers = rest;
        for (_, ns) in due {
            self.finish_namespace(&ns);
        }
        let (due, rest): (Vec<Timer>, Vec<Timer>) = std::mem::take(&mut self.timers).into_iter().partition(|t| t.due <= now);
        self.timers = rest;
        for t in due {
            if let Err(e) = self.finish_pod(&t.key, Some(&t.uid)) {
                tracing::debug!(error = %e, "pod termination timer");
            }
        }
        self.reconcile();
        self.fire_endpoint_slice_syncs(now);
    }

    fn create_node(&mut self, n: &super::NodeConfig) -> Result<Value, ApiError> {
        let mut labels = n.labels.clone();
        labels.entry("kubernetes.io/hostname".into()).or_insert_with(|| n.name.clone());
        labels.entry("kubernetes.io/os".into()).or_insert_with(|| "linux".into());
        let obj = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": n.name, "labels": labels},
            "spec": {},
            "status": {
                "addresses": [{"type": "InternalIP", "address": n.address.to_string()}, {"type": "Hostname", "address": n.name}],
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "kubelet is posting ready status (emulated)", "lastHeartbeatTime": now(), "lastTransitionTime": now()}],
            }
        });
        let key = (String::new(), n.name.clone());
        if self.objects[ids::nodes()].contains_key(&key) {
            let mut cur = self.get(ids::nodes(), "", &n.name)?;
            cur["metadata"]["labels"] = json!(labels);
            cur["status"] = obj["status"].clone();
            let cur = self.update(ids::nodes(), "", &n.name, cur.clone(), Sub::Main)?;
            let mut with_status = cur;
            with_status["status"] = obj["status"].clone();
            return self.update(ids::nodes(), "", &n.name, with_status, Sub::Status);
        }
        self.create(ids::nodes(), "", obj)
    }

    /// Adds (or replaces) a Node with an InternalIP address.
    pub fn add_node(&mut self, n: &super::NodeConfig) -> Result<Value, ApiError> {
        let r = self.create_node(n);
        self.reconcile();
        r
    }

    /// Kind-specific defaulting and allocation, as the real registry does
    /// before storing.
    fn prepare(&mut self, kind: KindId, obj: &mut Value, old: Option<&Value>) -> Result<(), ApiError> {
        let rk = &KINDS[kind];
        let name = meta_str(obj, "name").unwrap_or_default().to_string();
        if let Some(directive) = self.validation {
            let warnings = self.check_fields(kind, obj, directive)?;
            // What strict decoding refused is dropped otherwise (custom
            // resources: pruning, below). Strict and Warn found nothing to
            // drop when they let the write through without a word.
            if directive == Directive::Ignore || !warnings.is_empty() {
                validation::drop_unknown(kind, obj);
            }
            self.warnings.extend(warnings);
        }
        if let Some(schema) = self.schema_of(kind) {
            schema::prune_and_default(obj, schema);
            let errors = schema::validate(obj, schema);
            if !errors.is_empty() {
                return Err(ApiError::invalid_fields(rk, &name, &errors));
            }
        }
        if kind == ids::crds() {
            let errors = schema::structural_errors(obj);
            if !errors.is_empty() {
                return Err(ApiError::invalid_fields(rk, &name, &errors));
            }
        }
        if old.is_none() && rk.status && kind != ids::nodes() {
            // Real registries drop status on create for these kinds.
            if let Some(m) = obj.as_object_mut() {
                m.remove("status");
            }
        }
        if kind == ids::services() {
            self.check_service(obj, old)?;
            self.prepare_service(obj, old)?;
        } else if kind == ids::pods() && old.is_none() {
            prepare_pod(obj);
        } else if kind == ids::namespaces() {
            let name = meta_str(obj, "name").unwrap_or_default().to_string();
            let m = meta_mut(obj);
            let labels = m.entry("labels").or_insert_with(|| json!({}));
            if labels.is_object() {
                labels["kubernetes.io/metadata.name"] = json!(name);
            }
            if obj.pointer("/status/phase").is_none() {
                obj["status"] = json!({"phase": "Active"});
            }
            if old.is_none() && obj.pointer("/spec/finalizers").is_none() {
                // The finalizer the namespace controller removes once the namespace is empty.
                if !obj.get("spec").is_some_and(Value::is_object) {
                    obj["spec"] = json!({});
                }
                obj["spec"]["finalizers"] = json!(["kubernetes"]);
            }
        } else if kind == ids::deployments() && obj.pointer("/spec/replicas").is_none() {
            obj["spec"]["replicas"] = json!(1);
        } else if kind == ids::daemonsets() && obj.get("spec").is_some_and(Value::is_object) {
            // The real registry's defaults, which `kubectl rollout status` reads.
            if obj.pointer("/spec/updateStrategy/type").is_none() {
                obj["spec"]["updateStrategy"] = json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}});
            }
            if obj.pointer("/spec/revisionHistoryLimit").is_none() {
                obj["spec"]["revisionHistoryLimit"] = json!(10);
            }
        } else if kind == ids::endpointslices()
            && let Some(Value::Array(ports)) = obj.get_mut("ports")
        {
            for p in ports {
                if p.is_object() && p.get("protocol").is_none() {
                    p["protocol"] = json!("TCP");
                }
            }
        }
        Ok(())
    }


}

/// The kind an Event is also stored as, and the conversion to it (see [`events`]).
fn twin_of(kind: KindId) -> Option<(KindId, fn(&Value) -> Value)> {
    if kind == ids::events() {
        Some((ids::core_events(), events::to_core))
    } else if kind == ids::core_events() {
        Some((ids::events(), events::to_events_v1))
    } else {
        None
    }
}

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))
}

/// Pod defaults, and the status a freshly created pod has.
fn prepare_pod(obj: &mut Value) {
    let spec = &mut obj["spec"];
    if !spec.is_object() {
        *spec = json!({});
    }
    for (k, v) in [
        ("restartPolicy", json!("Always")),
        ("terminationGracePeriodSeconds", json!(30)),
        ("dnsPolicy", json!("ClusterFirst")),
        ("schedulerName", json!("default-scheduler")),
    ] {
        if spec.get(k).is_none() {
            spec[k] = v;
        }
    }
    if let Some(Value::Array(cs)) = spec.get_mut("containers") {
        for c in cs {
            if let Some(Value::Array(ps)) = c.get_mut("ports") {
                for p in ps {
                    if p.is_object() && p.get("protocol").is_none() {
                        p["protocol"] = json!("TCP");
                    }
                }
            }
        }
    }
    obj["status"] = json!({"phase": "Pending", "qosClass": "BestEffort"});
}


#[cfg(test)]
mod test {
    use super::*;

    fn store() -> Store {
        let (tx, _rx) = tokio::sync::watch::channel(0);
        Store::new(Config::default(), tx)
    }

    fn cm(name: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "labels": {"a": "1"}}, "data": {"k": "v"}})
    }

    fn cms() -> KindId {
        super::super::resources::find("", "v1", "configmaps").unwrap_or(usize::MAX)
    }

    #[test]
    fn create_get_update_conflict() {
        let mut s = store();
        let c = s.create(cms(), "default", cm("a")).expect("create");
        assert_eq!(c["metadata"]["generation"], 1);
        assert!(matches!(s.create(cms(), "default", cm("a")), Err(e) if e.code == 409 && e.reason == "AlreadyExists"));
        let mut stale = c.clone();
        stale["data"]["k"] = json!("w");
        let u = s.update(cms(), "default", "a", stale.clone(), Sub::Main).expect("update");
        assert_eq!(u["metadata"]["generation"], 2);
        assert!(matches!(s.update(cms(), "default", "a", stale, Sub::Main), Err(e) if e.code == 409 && e.reason == "Conflict"));
        assert!(matches!(s.create(cms(), "nope", cm("b")), Err(e) if e.code == 404));
    }

    #[test]
    fn a_dependent_written_after_its_owner_is_gone_is_collected() {
        let mut s = store();
        let owner = s.create(cms(), "default", cm("owner")).expect("owner");
        let uid = owner["metadata"]["uid"].clone();
        s.delete(cms(), "default", "owner", DeleteOptions::default()).expect("delete");
        // A controller that had not seen the deletion writes its dependent.
        let mut dep = cm("late");
        dep["metadata"]["ownerReferences"] = json!([{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}]);
        s.create(cms(), "default", dep).expect("dependent");
        s.reconcile();
        assert!(s.get(cms(), "default", "late").is_err(), "the orphan is collected");
        // One with a live owner stays.
        let alive = s.create(cms(), "default", cm("alive")).expect("owner");
        let mut dep = cm("kept");
        dep["metadata"]["ownerReferences"] =
            json!([{"apiVersion": "v1", "kind": "ConfigMap", "name": "alive", "uid": alive["metadata"]["uid"]}]);
        s.create(cms(), "default", dep).expect("dependent");
        s.reconcile();
        assert!(s.get(cms(), "default", "kept").is_ok());
    }

    #[test]
    fn finalizers_hold_deletion_and_gc_follows_owners() {
        let mut s = store();
        let mut owner = cm("owner");
        owner["metadata"]["finalizers"] = json!(["x/y"]);
        let owner = s.create(cms(), "default", owner).expect("owner");
        let mut dep = cm("dep");
        dep["metadata"]["ownerReferences"] =
            json!([{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner["metadata"]["uid"]}]);
        s.create(cms(), "default", dep).expect("dependent");
        let marked = s.delete(cms(), "default", "owner", DeleteOptions::default()).expect("delete");
        assert!(marked["metadata"]["deletionTimestamp"].is_string());
        assert!(s.get(cms(), "default", "dep").is_ok(), "dependent stays while the owner exists");
        let mut cleared = marked.clone();
        cleared["metadata"]["finalizers"] = json!([]);
        s.update(cms(), "default", "owner", cleared, Sub::Main).expect("clear finalizers");
        assert!(s.get(cms(), "default", "owner").is_err());
        assert!(s.get(cms(), "default", "dep").is_err(), "dependent collected");
    }

    #[test]
    fn watch_log_and_expiry() {
        let mut s = store();
        let start = s.rv;
        s.create(cms(), "default", cm("a")).expect("create");
        let f = Filter { kind: cms(), namespace: None, labels: LabelSelector::parse("a=1").unwrap_or_default(), fields: FieldSelector::default() };
        let evs = s.events_since(&f, start).expect("events");
        assert_eq!(evs.len(), 1);
        let mut relabel = s.get(cms(), "default", "a").expect("get");
        relabel["metadata"]["labels"]["a"] = json!("2");
        let after_create = s.rv;
        s.update(cms(), "default", "a", relabel, Sub::Main).expect("relabel");
        let evs = s.events_since(&f, after_create).expect("events");
        assert_eq!(evs[0].0, EventType::Deleted, "leaving the selector reads as DELETED");
        s.expire();
        assert!(s.events_since(&f, after_create).is_err());
        assert!(s.events_since(&f, s.rv).is_ok());
    }

    fn custom(plural: &str) -> KindId {
        super::super::resources::find("codesink.net", "v1alpha1", plural).unwrap_or(usize::MAX)
    }

    /// A PodInfoSlice `web-0` as the controller publishes it for the WeightedService `web` (uid `owner`).
    fn pod_info_slice(owner: &Value, pods: Value) -> Value {
        json!({
            "apiVersion": "codesink.net/v1alpha1", "kind": "PodInfoSlice",
            "metadata": {
                "name": "web-0", "namespace": "default", "labels": {"codesink.net/weighted-service": "web"},
                "ownerReferences": [{"apiVersion": "codesink.net/v1alpha1", "kind": "WeightedService", "name": "web",
                    "uid": owner, "controller": true, "blockOwnerDeletion": true}],
            },
            "spec": {"pods": pods},
        })
    }

    /// `PATCH …/podinfoslices/NAME?fieldManager=MANAGER&force=…` with `application/apply-patch+yaml`.
    fn apply_slice(s: &mut Store, manager: &str, force: bool, slice: &Value) -> Result<(Value, bool), ApiError> {
        let body = serde_json::to_vec(slice).unwrap_or_default();
        s.writer = Some(RequestWriter { manager: manager.into(), force });
        let apply = "application/apply-patch+yaml";
        let result = s.patch(custom("podinfoslices"), "default", "web-0", apply, &body, Sub::Main, Some(manager));
        s.writer = None;
        result
    }

    #[test]
    fn pod_info_slices_are_applied_as_the_controller_does_and_collected_with_their_weighted_service() {
        let mut s = store();
        let ws = json!({"apiVersion": "codesink.net/v1alpha1", "kind": "WeightedService", "metadata": {"name": "web"},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}],
                "weights": [{"weight": 1, "selector": {"env": "prod"}}]}});
        let ws = s.create(custom("weightedservices"), "default", ws).expect("the WeightedService");
        let owner = ws["metadata"]["uid"].clone();

        // Created by the apply (the CRD in deploy/crd.yaml prunes what it does not know).
        let pods = json!([
            {"name": "web-a", "labelSet": 1, "created": "2026-01-01T00:00:00Z",
                "readySince": "2026-01-01T00:00:05Z"},
            {"name": "web-b", "labelSet": 2, "created": "2026-01-01T00:00:01Z", "ip": "10.0.0.1"},
        ]);
        let controller = |s: &mut Store, pods: Value| apply_slice(s, "ipvs-operator", true, &pod_info_slice(&owner, pods));
        let (created, was_created) = controller(&mut s, pods).expect("the apply creates");
        assert!(was_created);
        assert_eq!(created["spec"]["pods"][0]["readySince"], "2026-01-01T00:00:05Z");
        let pruned = json!({"name": "web-b", "labelSet": 2, "created": "2026-01-01T00:00:01Z"});
        assert_eq!(created["spec"]["pods"][1], pruned);
        let managed = &created["metadata"]["managedFields"];
        let entry = (managed[0]["manager"].as_str(), managed[0]["operation"].as_str());
        assert_eq!(entry, (Some("ipvs-operator"), Some("Apply")), "{managed}");
        assert!(created.get("status").is_none());

        // Replaced as a whole (the list has no list type: atomic); the same apply again writes nothing.
        let now = json!([{"name": "web-b", "labelSet": 1, "created": "2026-01-01T00:00:01Z"}]);
        let (updated, was_created) = controller(&mut s, now.clone()).expect("the apply updates");
        assert!(!was_created);
        assert_eq!(updated["spec"]["pods"], now);
        let (again, _) = controller(&mut s, now.clone()).expect("the same apply");
        assert_eq!(again["metadata"]["resourceVersion"], updated["metadata"]["resourceVersion"]);

        // Another manager's apply of the pods conflicts unless forced; the
        // controller's forced apply takes them back (as after a bench loaded them).
        let theirs = json!([{"name": "web-c"}]);
        let conflict = apply_slice(&mut s, "someone", false, &pod_info_slice(&owner, theirs.clone())).expect_err("a conflict");
        assert_eq!(conflict.code, 409, "{conflict:?}");
        apply_slice(&mut s, "someone", true, &pod_info_slice(&owner, theirs)).expect("a forced apply");
        let (back, _) = controller(&mut s, now.clone()).expect("the controller's forced apply");
        assert_eq!(back["spec"]["pods"], now);

        // A pod without a name is invalid.
        let invalid = controller(&mut s, json!([{"labelSet": 1}])).expect_err("invalid");
        assert_eq!(invalid.code, 422, "{invalid:?}");

        // Deleting the WeightedService collects its slices.
        s.delete(custom("weightedservices"), "default", "web", DeleteOptions::default()).expect("deleting it");
        s.reconcile();
        assert!(s.get(custom("podinfoslices"), "default", "web-0").is_err(), "the slice is collected with its owner");
    }

    #[test]
    fn apply_is_idempotent_and_removes_dropped_fields() {
        let mut s = store();
        let applied = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a", "namespace": "default"}, "data": {"k": "v", "j": "w"}});
        let body = serde_json::to_vec(&applied).unwrap_or_default();
        let (first, created) = s.patch(cms(), "default", "a", "application/apply-patch+yaml", &body, Sub::Main, Some("m")).expect("apply");
        assert!(created);
        let (second, _) = s.patch(cms(), "default", "a", "application/apply-patch+yaml", &body, Sub::Main, Some("m")).expect("apply again");
        assert_eq!(first["metadata"]["resourceVersion"], second["metadata"]["resourceVersion"]);
        let less = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}, "data": {"k": "v"}});
        let body = serde_json::to_vec(&less).unwrap_or_default();
        let (third, _) = s.patch(cms(), "default", "a", "application/apply-patch+yaml", &body, Sub::Main, Some("m")).expect("apply less");
        assert_eq!(third["data"], json!({"k": "v"}));
    }
}
