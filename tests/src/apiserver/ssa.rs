//! Server-side apply and field ownership, after structured-merge-diff (the
//! library behind the real server's field manager):
//!
//! - Field sets are paths of field names, list-map keys (`k:{"port":80,
//!   "protocol":"TCP"}`) and set values (`v:"a"`), encoded as `fieldsV1` in
//!   `metadata.managedFields`; an element of a keyed list is owned itself
//!   (`"."`) besides its fields.
//! - List and map semantics come from the schema: a custom resource's CRD
//!   (`x-kubernetes-list-type`, `x-kubernetes-list-map-keys`,
//!   `x-kubernetes-map-type`; lists without a type are atomic), and for
//!   built-in kinds the list types their OpenAPI declares ([`builtin_list`]:
//!   k8s-openapi's `merge_strategies` for the kinds served, e.g. a Service's
//!   `spec.ports` keyed by `port` and `protocol`, its `spec.selector` atomic).
//! - An apply merges keyed lists element by element and sets by value, and
//!   replaces atomic lists and maps; fields the manager applied before and no
//!   longer applies are removed unless another manager owns them. A field
//!   another manager owns that the apply would change is a conflict: `409
//!   Conflict` with the real server's message and causes, unless `force`,
//!   which takes the field over.
//! - Every other write (create, update, patch) records what it changed for
//!   its manager (`fieldManager`, else the user agent up to its first `/`) as
//!   an `Update` entry, and takes those fields from the other managers.
//!
//! Limits of the double: applied items keep the live list's order (new ones
//! last); the applied configuration is not checked for fields it may not set.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};

use super::error::ApiError;

/// One step of a field path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Step {
    /// A map field: `f:name`.
    Field(String),
    /// An element of a keyed list, by its key fields as JSON: `k:{…}`.
    Key(String),
    /// An element of a set, by its value as JSON: `v:…`.
    Value(String),
}

/// A path from the object's root.
pub type Path = Vec<Step>;

/// How a list or map merges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Merge {
    /// Replaced whole, owned whole.
    Atomic,
    /// A set of scalars, merged by value.
    Set,
    /// A list of objects keyed by these fields.
    Map(Vec<String>),
}

/// Where a value sits, for its merge semantics: the custom resource's schema
/// node, or the built-in kind and the field names from the root.
#[derive(Clone)]
pub(crate) struct Node<'a> {
    schema: Option<&'a Value>,
    /// A custom resource: what its schema does not describe (preserved
    /// unknown fields) has atomic lists and granular maps.
    custom: bool,
    kind: &'static str,
    names: Vec<String>,
}

impl<'a> Node<'a> {
    /// The root of an object of built-in `kind`, or of a custom resource with `schema`.
    pub(crate) fn root(kind: &'static str, schema: Option<&'a Value>) -> Self {
        Self { schema, custom: schema.is_some(), kind, names: Vec::new() }
    }

    fn field(&self, name: &str) -> Self {
        let schema = self.schema.and_then(|s| {
            s.get("properties").and_then(|p| p.get(name)).or_else(|| s.get("additionalProperties").filter(|a| a.is_object()))
        });
        let mut names = self.names.clone();
        names.push(name.to_string());
        Self { schema, custom: self.custom, kind: self.kind, names }
    }

    fn item(&self) -> Self {
        let mut names = self.names.clone();
        if let Some(last) = names.last_mut() {
            last.push_str("[]");
        }
        Self { schema: self.schema.and_then(|s| s.get("items")), custom: self.custom, kind: self.kind, names }
    }

    /// How the list at this node merges.
    fn list(&self) -> Merge {
        // metadata is ObjectMeta in every kind.
        if self.names.first().map(String::as_str) == Some("metadata") {
            return builtin_list("", &self.names);
        }
        match self.schema {
            Some(s) => match s.get("x-kubernetes-list-type").and_then(Value::as_str) {
                Some("set") => Merge::Set,
                Some("map") => Merge::Map(
                    s.get("x-kubernetes-list-map-keys").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).map(String::from).collect(),
                ),
                _ => Merge::Atomic,
            },
            None if self.custom => Merge::Atomic,
            None => builtin_list(self.kind, &self.names),
        }
    }

    /// Whether the map at this node is atomic.
    fn atomic_map(&self) -> bool {
        match self.schema {
            Some(s) => s.get("x-kubernetes-map-type").and_then(Value::as_str) == Some("atomic"),
            None => !self.custom && builtin_atomic_map(self.kind, &self.names),
        }
    }
}

fn ends_with(names: &[String], suffix: &[&str]) -> bool {
    names.len() >= suffix.len() && names[names.len() - suffix.len()..].iter().zip(suffix).all(|(a, b)| a == b)
}

/// The list types the built-in kinds' OpenAPI declares, by where the list
/// sits (`names` from the root, `[]` after a list's name inside its items):
/// what k8s-openapi's `DeepMerge` implementations follow
/// (`merge_strategies::list::{map,set,atomic}`). Lists not named here are
/// atomic.
pub fn builtin_list(kind: &str, names: &[String]) -> Merge {
    let keys = |k: &[&str]| Merge::Map(k.iter().map(|s| s.to_string()).collect());
    let Some(last) = names.last().map(String::as_str) else { return Merge::Atomic };
    let pod_spec = |field: &str| ends_with(names, &["spec", field]);
    match (kind, last) {
        (_, "finalizers") if ends_with(names, &["metadata", "finalizers"]) => Merge::Set,
        (_, "ownerReferences") => keys(&["uid"]),
        (_, "managedFields") => Merge::Atomic,
        ("Service", "ports") if names.len() == 2 => keys(&["port", "protocol"]),
        ("Service", "conditions") | (_, "conditions") if names.len() == 2 && names[0] == "status" => keys(&["type"]),
        (_, "containers" | "initContainers" | "ephemeralContainers") if pod_spec(last) => keys(&["name"]),
        (_, "ports") if ends_with(names, &["containers[]", "ports"]) || ends_with(names, &["initContainers[]", "ports"]) => {
            keys(&["containerPort", "protocol"])
        }
        (_, "env") => keys(&["name"]),
        (_, "volumeMounts") => keys(&["mountPath"]),
        (_, "volumeDevices") => keys(&["devicePath"]),
        (_, "volumes" | "imagePullSecrets" | "resourceClaims") if pod_spec(last) => keys(&["name"]),
        (_, "hostAliases") if pod_spec(last) => keys(&["ip"]),
        (_, "topologySpreadConstraints") if pod_spec(last) => keys(&["topologyKey", "whenUnsatisfiable"]),
        _ => Merge::Atomic,
    }
}

/// The atomic maps of the built-in kinds served (`x-kubernetes-map-type:
/// atomic`): a Service's `spec.selector`, a workload's label selector.
fn builtin_atomic_map(kind: &str, names: &[String]) -> bool {
    match (kind, names.iter().map(String::as_str).collect::<Vec<_>>().as_slice()) {
        ("Service", ["spec", "selector"]) => true,
        ("Deployment" | "DaemonSet", ["spec", "selector"]) => true,
        _ => false,
    }
}

/// The key of a keyed list's element, as JSON with the keys in order; a
/// Service port without a protocol is keyed as TCP (its default).
fn key_of(item: &Value, keys: &[String]) -> String {
    let mut m = Map::new();
    for k in keys {
        match item.get(k) {
            Some(v) => {
                m.insert(k.clone(), v.clone());
            }
            None if k == "protocol" => {
                m.insert(k.clone(), json!("TCP"));
            }
            None => {}
        }
    }
    Value::Object(m).to_string()
}

/// The paths a value sets: leaves, and the elements of keyed lists and sets.
pub(crate) fn field_set(v: &Value, node: &Node<'_>) -> BTreeSet<Path> {
    let mut out = BTreeSet::new();
    walk(v, node, &mut Vec::new(), &mut out);
    out.retain(|p| !unowned(p));
    out
}

/// Identity and server-kept fields nobody owns.
fn unowned(p: &Path) -> bool {
    let names: Vec<&str> = p.iter().map(|s| if let Step::Field(f) = s { f.as_str() } else { "" }).collect();
    matches!(
        names.as_slice(),
        ["apiVersion"] | ["kind"] | ["metadata"]
            | ["metadata", "name" | "namespace" | "uid" | "resourceVersion" | "generation" | "creationTimestamp" | "managedFields"
                | "deletionTimestamp" | "deletionGracePeriodSeconds" | "selfLink", ..]
    )
}

fn walk(v: &Value, node: &Node<'_>, prefix: &mut Path, out: &mut BTreeSet<Path>) {
    match v {
        Value::Object(m) if !m.is_empty() && !node.atomic_map() => {
            for (k, c) in m {
                prefix.push(Step::Field(k.clone()));
                walk(c, &node.field(k), prefix, out);
                prefix.pop();
            }
        }
        Value::Array(items) => match node.list() {
            Merge::Set => {
                for x in items {
                    prefix.push(Step::Value(x.to_string()));
                    out.insert(prefix.clone());
                    prefix.pop();
                }
            }
            Merge::Map(keys) => {
                let item_node = node.item();
                for x in items {
                    prefix.push(Step::Key(key_of(x, &keys)));
                    out.insert(prefix.clone());
                    walk(x, &item_node, prefix, out);
                    prefix.pop();
                }
            }
            _ => {
                out.insert(prefix.clone());
            }
        },
        _ => {
            out.insert(prefix.clone());
        }
    }
}

/// The value at `path`, if there.
pub(crate) fn get<'v>(v: &'v Value, path: &[Step], root: &Node<'_>) -> Option<&'v Value> {
    let mut cur = v;
    let mut node = root.clone();
    for s in path {
        (cur, node) = match s {
            Step::Field(f) => (cur.get(f)?, node.field(f)),
            Step::Key(k) => {
                let Merge::Map(keys) = node.list() else { return None };
                (cur.as_array()?.iter().find(|x| key_of(x, &keys) == *k)?, node.item())
            }
            Step::Value(j) => (cur.as_array()?.iter().find(|x| x.to_string() == *j)?, node.item()),
        };
    }
    Some(cur)
}

/// Removes the value at `path` (a field or a list element), and maps left
/// empty above it.
fn remove(v: &mut Value, path: &[Step], node: &Node<'_>) {
    let Some((first, rest)) = path.split_first() else { return };
    if rest.is_empty() {
        match (first, v) {
            (Step::Field(f), Value::Object(m)) => {
                m.remove(f);
            }
            (Step::Key(k), Value::Array(items)) => {
                if let Merge::Map(keys) = node.list() {
                    items.retain(|x| key_of(x, &keys) != *k);
                }
            }
            (Step::Value(j), Value::Array(items)) => items.retain(|x| x.to_string() != *j),
            _ => {}
        }
        return;
    }
    let child_node = match first {
        Step::Field(f) => node.field(f),
        _ => node.item(),
    };
    let child = match (first, &mut *v) {
        (Step::Field(f), Value::Object(m)) => m.get_mut(f),
        (Step::Key(k), Value::Array(items)) => match node.list() {
            Merge::Map(keys) => items.iter_mut().find(|x| key_of(x, &keys) == *k),
            _ => None,
        },
        (Step::Value(j), Value::Array(items)) => items.iter_mut().find(|x| x.to_string() == *j),
        _ => None,
    };
    if let Some(child) = child {
        remove(child, rest, &child_node);
        let emptied = child.as_object().is_some_and(Map::is_empty);
        if emptied && let (Step::Field(f), Value::Object(m)) = (first, v) {
            m.remove(f);
        }
    }
}

/// Merges an applied configuration into the live value.
fn merge(live: &mut Value, applied: &Value, node: &Node<'_>) {
    match (&mut *live, applied) {
        (Value::Object(lm), Value::Object(am)) if !node.atomic_map() => {
            for (k, a) in am {
                match lm.get_mut(k) {
                    Some(l) => merge(l, a, &node.field(k)),
                    None => {
                        lm.insert(k.clone(), a.clone());
                    }
                }
            }
        }
        (Value::Array(li), Value::Array(ai)) => match node.list() {
            Merge::Set => {
                for a in ai {
                    if !li.contains(a) {
                        li.push(a.clone());
                    }
                }
            }
            Merge::Map(keys) => {
                let item = node.item();
                for a in ai {
                    let k = key_of(a, &keys);
                    match li.iter_mut().find(|x| key_of(x, &keys) == k) {
                        Some(l) => merge(l, a, &item),
                        None => li.push(a.clone()),
                    }
                }
            }
            _ => *live = applied.clone(),
        },
        _ => *live = applied.clone(),
    }
}

// ---- fieldsV1 ----

fn step_key(s: &Step) -> String {
    match s {
        Step::Field(f) => format!("f:{f}"),
        Step::Key(k) => format!("k:{k}"),
        Step::Value(v) => format!("v:{v}"),
    }
}

/// Encodes a field set as `fieldsV1`.
pub fn to_fields_v1(set: &BTreeSet<Path>) -> Value {
    let mut root = Map::new();
    for p in set {
        let mut cur = &mut root;
        for (i, s) in p.iter().enumerate() {
            let next = cur.entry(step_key(s)).or_insert_with(|| json!({}));
            let Value::Object(m) = next else { break };
            cur = m;
            // An element owned itself, with fields under it: `".": {}`.
            if i + 1 == p.len() && !matches!(s, Step::Field(_)) && set.range(p.clone()..).nth(1).is_some_and(|q| q.starts_with(p)) {
                cur.insert(".".into(), json!({}));
            }
        }
    }
    Value::Object(root)
}

/// Decodes `fieldsV1` into a field set.
pub fn from_fields_v1(v: &Value) -> BTreeSet<Path> {
    fn walk(v: &Value, prefix: &mut Path, out: &mut BTreeSet<Path>) {
        let Value::Object(m) = v else { return };
        let mut children = false;
        for (k, c) in m {
            let step = if let Some(f) = k.strip_prefix("f:") {
                Step::Field(f.to_string())
            } else if let Some(key) = k.strip_prefix("k:") {
                Step::Key(key.to_string())
            } else if let Some(val) = k.strip_prefix("v:") {
                Step::Value(val.to_string())
            } else {
                if k == "." && !prefix.is_empty() {
                    out.insert(prefix.clone());
                }
                continue;
            };
            children = true;
            prefix.push(step);
            walk(c, prefix, out);
            prefix.pop();
        }
        if !children && !prefix.is_empty() {
            out.insert(prefix.clone());
        }
    }
    let mut out = BTreeSet::new();
    walk(v, &mut Vec::new(), &mut out);
    out
}

/// A path as the real server prints it in conflicts:
/// `.spec.ports[port=80,protocol="TCP"].targetPort`, `.metadata.finalizers[="a"]`.
pub fn display(p: &Path) -> String {
    let mut s = String::new();
    for step in p {
        match step {
            Step::Field(f) => {
                s.push('.');
                s.push_str(f);
            }
            Step::Key(k) => {
                let m: Map<String, Value> = serde_json::from_str(k).unwrap_or_default();
                let parts: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v}")).collect();
                s.push_str(&format!("[{}]", parts.join(",")));
            }
            Step::Value(v) => s.push_str(&format!("[={v}]")),
        }
    }
    s
}

// ---- managedFields ----

/// One `managedFields` entry.
#[derive(Debug, Clone)]
struct Entry {
    manager: String,
    operation: String,
    subresource: String,
    api_version: String,
    time: String,
    set: BTreeSet<Path>,
}

impl Entry {
    fn new(w: &Writer<'_>, operation: &str, set: BTreeSet<Path>) -> Self {
        Self {
            manager: w.manager.to_string(),
            operation: operation.to_string(),
            subresource: w.subresource.to_string(),
            api_version: w.api_version.to_string(),
            time: w.time.clone(),
            set,
        }
    }

    fn parse(v: &Value) -> Option<Self> {
        let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
        Some(Self {
            manager: v.get("manager")?.as_str()?.to_string(),
            operation: s("operation"),
            subresource: s("subresource"),
            api_version: s("apiVersion"),
            time: s("time"),
            set: v.get("fieldsV1").map(from_fields_v1).unwrap_or_default(),
        })
    }

    fn render(&self) -> Value {
        let mut e = json!({"manager": self.manager, "operation": self.operation, "apiVersion": self.api_version,
            "time": self.time, "fieldsType": "FieldsV1", "fieldsV1": to_fields_v1(&self.set)});
        if !self.subresource.is_empty() {
            e["subresource"] = json!(self.subresource);
        }
        e
    }

    fn is(&self, manager: &str, operation: &str, subresource: &str) -> bool {
        self.manager == manager && self.operation == operation && self.subresource == subresource
    }
}

fn entries(obj: &Value) -> Vec<Entry> {
    obj.pointer("/metadata/managedFields").and_then(Value::as_array).into_iter().flatten().filter_map(Entry::parse).collect()
}

fn store_entries(obj: &mut Value, mut list: Vec<Entry>) {
    list.retain(|e| !e.set.is_empty());
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) else { return };
    if list.is_empty() {
        meta.remove("managedFields");
    } else {
        meta.insert("managedFields".into(), Value::Array(list.iter().map(Entry::render).collect()));
    }
}

/// Who is writing and how: the manager, the subresource and the object's
/// apiVersion, and the time to record.
pub(crate) struct Writer<'a> {
    pub manager: &'a str,
    pub subresource: &'a str,
    pub api_version: &'a str,
    pub time: String,
}

/// Server-side apply of `applied` onto `live` (`None`: a create). Returns
/// the object to store, its `managedFields` set, or the 409 of conflicts.
pub(crate) fn apply(live: Option<&Value>, applied: &Value, node: &Node<'_>, w: &Writer<'_>, force: bool) -> Result<Value, ApiError> {
    let mut next = live.cloned().unwrap_or_else(|| json!({}));
    let set = field_set(applied, node);
    let mut list = live.map(entries).unwrap_or_default();
    // Conflicts: a field another manager owns that this apply changes.
    let mut conflicts: BTreeMap<usize, Vec<Path>> = BTreeMap::new();
    for (i, e) in list.iter().enumerate() {
        if e.is(w.manager, "Apply", w.subresource) {
            continue;
        }
        // Elements themselves never conflict, their fields do.
        for p in set.intersection(&e.set).filter(|p| matches!(p.last(), Some(Step::Field(_)))) {
            if get(&next, p, node) != get(applied, p, node) {
                conflicts.entry(i).or_default().push(p.clone());
            }
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(conflict_error(&list, &conflicts));
    }
    for (i, paths) in &conflicts {
        for p in paths {
            list[*i].set.remove(p);
        }
    }
    // Fields this manager applied before and applies no more go, unless
    // someone else owns them (or something under them).
    let before: BTreeSet<Path> =
        list.iter().filter(|e| e.is(w.manager, "Apply", w.subresource)).flat_map(|e| e.set.iter().cloned()).collect();
    let others: BTreeSet<Path> =
        list.iter().filter(|e| !e.is(w.manager, "Apply", w.subresource)).flat_map(|e| e.set.iter().cloned()).collect();
    let gone: BTreeSet<&Path> = before.difference(&set).collect();
    // What goes with an element or map going too is not removed on its own
    // (an element's key fields find it).
    let tops = gone.iter().filter(|p| !(1..p.len()).any(|n| gone.contains(&p[..n].to_vec())));
    for p in tops.copied().collect::<Vec<&Path>>().into_iter().rev() {
        let owned_below = others.range::<Path, _>(p.clone()..).next().is_some_and(|q| q.starts_with(p));
        if !owned_below {
            remove(&mut next, p, node);
        }
    }
    merge(&mut next, applied, node);
    match list.iter_mut().find(|e| e.is(w.manager, "Apply", w.subresource)) {
        Some(e) => {
            if e.set != set {
                e.time = w.time.clone();
            }
            e.set = set;
            e.api_version = w.api_version.to_string();
        }
        None => list.push(Entry::new(w, "Apply", set)),
    }
    store_entries(&mut next, list);
    Ok(next)
}

fn conflict_error(list: &[Entry], conflicts: &BTreeMap<usize, Vec<Path>>) -> ApiError {
    let n: usize = conflicts.values().map(Vec::len).sum();
    let mut causes = Vec::new();
    let mut groups = Vec::new();
    for (i, paths) in conflicts {
        let e = &list[*i];
        let with = format!("{:?} using {}", e.manager, e.api_version);
        for p in paths {
            causes.push(json!({"reason": "FieldManagerConflict", "message": format!("conflict with {with}"), "field": display(p)}));
        }
        groups.push((with, paths.iter().map(display).collect::<Vec<_>>()));
    }
    // structured-merge-diff's words, wrapped by the API server's.
    let message = match (n, groups.as_slice()) {
        (1, [(with, paths)]) => format!("Apply failed with 1 conflict: conflict with {with}: {}", paths[0]),
        _ => {
            let body: Vec<String> =
                groups.iter().map(|(with, paths)| format!("conflicts with {with}:\n{}", paths.iter().map(|p| format!("- {p}")).collect::<Vec<_>>().join("\n"))).collect();
            format!("Apply failed with {n} conflicts: {}", body.join("\n"))
        }
    };
    ApiError { code: 409, reason: "Conflict", message, details: Some(json!({"causes": causes})) }
}

/// Records a write other than an apply: the fields it changed from `old`
/// (`None`: a create) to `new` go to `w`'s `Update` entry and leave every
/// other entry; fields it removed leave every entry. `server_set` are fields
/// the server filled in itself (allocations), owned by nobody.
pub(crate) fn record_update(old: Option<&Value>, new: &mut Value, node: &Node<'_>, w: &Writer<'_>, server_set: &BTreeSet<Path>) {
    let empty = json!({});
    let before = old.unwrap_or(&empty);
    let old_set = field_set(before, node);
    let new_set = field_set(new, node);
    let changed: BTreeSet<Path> = new_set
        .iter()
        .filter(|p| !server_set.contains(*p) && get(before, p, node) != get(new, p, node))
        .cloned()
        .collect();
    let removed: BTreeSet<Path> = old_set.difference(&new_set).cloned().collect();
    let mut list = old.map(entries).unwrap_or_default();
    for e in &mut list {
        let mine = e.is(w.manager, "Update", w.subresource);
        e.set.retain(|p| !removed.contains(p) && (mine || !changed.contains(p)));
    }
    if !changed.is_empty() {
        match list.iter_mut().find(|e| e.is(w.manager, "Update", w.subresource)) {
            Some(e) => {
                e.set.extend(changed);
                e.time = w.time.clone();
                e.api_version = w.api_version.to_string();
            }
            None => list.push(Entry::new(w, "Update", changed)),
        }
    }
    store_entries(new, list);
}

/// The paths of fields the server set in `new` that the request did not
/// send: a Service's allocated ClusterIPs, IP families and node ports.
pub(crate) fn allocated_fields(kind: &str, request: &Value, new: &Value, node: &Node<'_>) -> BTreeSet<Path> {
    if kind != "Service" {
        return BTreeSet::new();
    }
    let sent = field_set(request, node);
    field_set(new, node)
        .into_iter()
        .filter(|p| {
            let names: Vec<&str> = p.iter().filter_map(|s| if let Step::Field(f) = s { Some(f.as_str()) } else { None }).collect();
            matches!(names.as_slice(), ["spec", "clusterIP" | "clusterIPs" | "ipFamilies" | "ipFamilyPolicy"] | ["spec", "ports", "nodePort"])
        })
        .filter(|p| !sent.contains(p))
        .collect()
}

#[cfg(test)]
mod test {
    use super::*;

    fn w(manager: &str) -> Writer<'_> {
        Writer { manager, subresource: "", api_version: "v1", time: "2026-12-04T00:00:00Z".into() }
    }

    fn svc(ports: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}, "spec": {"selector": {"app": "web"}, "ports": ports}})
    }

    #[test]
    fn service_ports_merge_by_port_and_protocol_and_each_manager_keeps_its_own() {
        let node = Node::root("Service", None);
        let a = apply(None, &svc(json!([{"name": "http", "port": 80, "protocol": "TCP"}])), &node, &w("operator"), false).expect("create");
        // Another manager applies a second port (and the same selector: shared, no conflict).
        let b = apply(Some(&a), &svc(json!([{"name": "dns", "port": 53, "protocol": "UDP"}])), &node, &w("user"), false).expect("merge");
        assert_eq!(b["spec"]["ports"], json!([{"name": "http", "port": 80, "protocol": "TCP"}, {"name": "dns", "port": 53, "protocol": "UDP"}]));
        // The operator drops nothing of the user's when it re-applies its own.
        let c = apply(Some(&b), &svc(json!([{"name": "http", "port": 80, "protocol": "TCP"}])), &node, &w("operator"), false).expect("again");
        assert_eq!(c["spec"]["ports"].as_array().map(Vec::len), Some(2));
        let fields = &c["metadata"]["managedFields"];
        assert_eq!(fields.as_array().map(Vec::len), Some(2), "{fields}");
        assert!(fields[0]["fieldsV1"]["f:spec"]["f:ports"].get("k:{\"port\":80,\"protocol\":\"TCP\"}").is_some(), "{fields}");
        assert_eq!(fields[0]["fieldsV1"]["f:spec"]["f:ports"]["k:{\"port\":80,\"protocol\":\"TCP\"}"]["."], json!({}));
        // The user stops applying its port: it goes.
        let d = apply(Some(&c), &svc(json!([])), &node, &w("user"), false).expect("drop");
        assert_eq!(d["spec"]["ports"], json!([{"name": "http", "port": 80, "protocol": "TCP"}]));
    }

    #[test]
    fn a_changed_field_another_manager_owns_conflicts_unless_forced() {
        let node = Node::root("Service", None);
        let a = apply(None, &svc(json!([{"name": "http", "port": 80, "targetPort": 8080}])), &node, &w("operator"), false).expect("create");
        let mut other = svc(json!([{"name": "http", "port": 80, "targetPort": 9090}]));
        other["spec"]["selector"] = json!({"app": "other"});
        let err = apply(Some(&a), &other, &node, &w("user"), false).expect_err("conflicts");
        assert_eq!(err.code, 409);
        assert_eq!(
            err.message,
            "Apply failed with 2 conflicts: conflicts with \"operator\" using v1:\n- .spec.ports[port=80,protocol=\"TCP\"].targetPort\n- .spec.selector"
        );
        let forced = apply(Some(&a), &other, &node, &w("user"), true).expect("forced");
        assert_eq!(forced["spec"]["selector"], json!({"app": "other"}));
        let entries = entries(&forced);
        let operator = entries.iter().find(|e| e.manager == "operator").expect("operator entry");
        assert!(!operator.set.iter().any(|p| p.last() == Some(&Step::Field("selector".into()))), "ownership moved");
    }

    #[test]
    fn updates_are_recorded_and_take_fields_from_appliers() {
        let node = Node::root("Service", None);
        let a = apply(None, &svc(json!([{"name": "http", "port": 80}])), &node, &w("operator"), false).expect("create");
        let mut edited = a.clone();
        edited["spec"]["selector"] = json!({"app": "edited"});
        record_update(Some(&a), &mut edited, &node, &w("kubectl-edit"), &BTreeSet::new());
        let list = entries(&edited);
        let edit = list.iter().find(|e| e.manager == "kubectl-edit").expect("an Update entry");
        assert_eq!(edit.operation, "Update");
        assert_eq!(edit.set, [vec![Step::Field("spec".into()), Step::Field("selector".into())]].into());
        // The operator's next apply of its selector conflicts with the edit…
        assert_eq!(apply(Some(&edited), &a, &node, &w("operator"), false).expect_err("conflict").code, 409);
        // …and takes it back when forced, as the operator applies.
        let back = apply(Some(&edited), &a, &node, &w("operator"), true).expect("forced");
        assert_eq!(back["spec"]["selector"], json!({"app": "web"}));
    }

    #[test]
    fn fields_v1_round_trips_with_elements_and_sets() {
        let node = Node::root("Pod", None);
        let pod = json!({"metadata": {"finalizers": ["a"], "labels": {"x": "1"}}, "spec": {"containers": [{"name": "web", "image": "nginx", "ports": [{"containerPort": 80}]}]}});
        let set = field_set(&pod, &node);
        assert_eq!(from_fields_v1(&to_fields_v1(&set)), set);
        assert_eq!(display(&set.iter().find(|p| matches!(p.last(), Some(Step::Value(_)))).cloned().expect("a set element")), ".metadata.finalizers[=\"a\"]");
    }
}
