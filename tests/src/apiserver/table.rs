//! `meta.k8s.io/v1` `Table` answers, as `kubectl get` asks for them
//! (`Accept: application/json;as=Table;v=v1;g=meta.k8s.io`).
//!
//! Columns, as the real server gives them:
//! - custom resources: `Name`, then the stored CRD's `additionalPrinterColumns`
//!   for the served version, their JSONPaths evaluated here (the simple paths
//!   CRDs use: `.a.b`, `[0]`, `[*]` and `[?(@.x=="y")]` filters; the first
//!   result is shown, as the real server does); a CRD without printer columns,
//!   or none stored, gives `Name` and `Age`;
//! - Services, Pods, Deployments and DaemonSets: the columns of the real
//!   server's printers (computed from what the emulated cluster stores: a pod's
//!   READY counts its containers as all ready or none, from its Ready
//!   condition, since the emulated kubelet writes no container statuses);
//! - every other built-in kind: `Name` and `Age` (the real server has
//!   per-kind columns for most of them).
//!
//! `includeObject` (`Metadata`, the default, `Object` or `None`) says what
//! each row carries in `object`. kubectl adds the NAMESPACE column itself,
//! from the rows' objects.

use serde_json::{Value, json};

use super::error::ApiError;
use super::resources::{KINDS, KindId, ids};
use super::store::Store;

/// What each row's `object` holds (`includeObject`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Include {
    None,
    Metadata,
    Object,
}

impl Include {
    pub(crate) fn parse(v: Option<&str>) -> Result<Self, ApiError> {
        match v.unwrap_or("") {
            "" | "Metadata" => Ok(Self::Metadata),
            "Object" => Ok(Self::Object),
            "None" => Ok(Self::None),
            other => Err(ApiError::bad_request(format!("unrecognized includeObject value: {other:?}"))),
        }
    }
}

/// How a column's cells are computed.
#[derive(Debug, Clone)]
enum Cell {
    Name,
    Age,
    /// A CRD printer column: its JSONPath and type.
    Path(Option<Vec<Step>>, String),
    /// A built-in printer's column.
    Builtin(fn(&Value) -> Value),
}

#[derive(Debug, Clone)]
struct Column {
    def: Value,
    cell: Cell,
}

fn column(name: &str, typ: &str, format: &str, priority: i64, description: &str, cell: Cell) -> Column {
    Column { def: json!({"name": name, "type": typ, "format": format, "description": description, "priority": priority}), cell }
}

const NAME_DOC: &str = "Name must be unique within a namespace. Is required when creating resources, although some resources may allow a client to request the generation of an appropriate name automatically. Name is primarily intended for creation idempotence and configuration definition. Cannot be updated. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names";
const AGE_DOC: &str = "CreationTimestamp is a timestamp representing the server time when this object was created. It is not guaranteed to be set in happens-before order across separate operations. Clients may not set this value. It is represented in RFC3339 form and is in UTC.";

fn name_column() -> Column {
    column("Name", "string", "name", 0, NAME_DOC, Cell::Name)
}

fn age_column() -> Column {
    column("Age", "string", "", 0, AGE_DOC, Cell::Age)
}

/// The columns of a kind's Table.
pub(crate) struct Columns(Vec<Column>, Option<fn(&Value) -> Value>);

impl Columns {
    /// The columns for `kind`, from the CRD stored for it when it is a custom resource.
    pub(crate) fn for_kind(st: &Store, kind: KindId) -> Self {
        let k = &KINDS[kind];
        let builtin = |cols: Vec<(&str, &str, i64, &str, fn(&Value) -> Value)>| {
            let mut out = vec![name_column()];
            for (name, typ, priority, doc, f) in cols {
                out.push(if name == "Age" { age_column() } else { column(name, typ, "", priority, doc, Cell::Builtin(f)) });
            }
            Self(out, None)
        };
        if kind == ids::services() {
            return builtin(vec![
                ("Type", "string", 0, "The type of the service.", |o| json!(str_at(o, "/spec/type").unwrap_or("ClusterIP"))),
                ("Cluster-IP", "string", 0, "The cluster IP of the service.", |o| json!(non_empty(str_at(o, "/spec/clusterIP")))),
                ("External-IP", "string", 0, "The external IPs of the service.", service_external_ips),
                ("Port(s)", "string", 0, "The ports of the service.", service_ports),
                ("Age", "", 0, "", |_| Value::Null),
                ("Selector", "string", 1, "The selector of the service.", |o| json!(format_labels(o.pointer("/spec/selector")))),
            ]);
        }
        if kind == ids::pods() {
            return builtin(vec![
                ("Ready", "string", 0, "The aggregate readiness state of this pod for accepting traffic.", pod_ready),
                ("Status", "string", 0, "The aggregate status of the containers in this pod.", pod_status),
                ("Restarts", "string", 0, "The number of times the containers in this pod have been restarted and when the last container in this pod has restarted.", |_| json!("0")),
                ("Age", "", 0, "", |_| Value::Null),
                ("IP", "string", 1, "The IP address assigned to the pod.", |o| json!(non_empty(str_at(o, "/status/podIP")))),
                ("Node", "string", 1, "The node the pod is scheduled on.", |o| json!(non_empty(str_at(o, "/spec/nodeName")))),
            ]);
        }
        if kind == ids::deployments() {
            return builtin(vec![
                ("Ready", "string", 0, "Number of the pod with ready state", |o| {
                    json!(format!("{}/{}", int_at(o, "/status/readyReplicas"), o.pointer("/spec/replicas").and_then(Value::as_i64).unwrap_or(1)))
                }),
                ("Up-to-date", "integer", 0, "Total number of non-terminated pods targeted by this deployment that have the desired template spec.", |o| json!(int_at(o, "/status/updatedReplicas"))),
                ("Available", "integer", 0, "Total number of available pods (ready for at least minReadySeconds) targeted by this deployment.", |o| json!(int_at(o, "/status/availableReplicas"))),
                ("Age", "", 0, "", |_| Value::Null),
                ("Containers", "string", 1, "Names of each container in the template.", containers),
                ("Images", "string", 1, "Images referenced by each container in the template.", images),
                ("Selector", "string", 1, "Label selector for pods. Existing ReplicaSets whose pods are selected by this will be the ones affected by this deployment.", |o| json!(format_labels(o.pointer("/spec/selector/matchLabels")))),
            ]);
        }
        if kind == ids::core_events() || kind == ids::events() {
            // Events lead with Last Seen; their name comes last, in -o wide.
            let core: fn(&Value) -> Value = if kind == ids::events() { super::events::to_core } else { |o| o.clone() };
            let mut out = Vec::new();
            for (name, priority, f) in [
                ("Last Seen", 0, event_last_seen as fn(&Value) -> Value),
                ("Type", 0, |o: &Value| json!(str_at(o, "/type").unwrap_or_default())),
                ("Reason", 0, |o: &Value| json!(str_at(o, "/reason").unwrap_or_default())),
                ("Object", 0, event_object),
                ("Subobject", 1, |o: &Value| json!(str_at(o, "/involvedObject/fieldPath").unwrap_or_default())),
                ("Source", 1, event_source),
                ("Message", 0, |o: &Value| json!(str_at(o, "/message").unwrap_or_default().trim())),
                ("First Seen", 1, event_first_seen),
                ("Count", 1, event_count),
            ] {
                out.push(column(name, "string", "", priority, "", Cell::Builtin(f)));
            }
            let mut name = name_column();
            name.def["priority"] = json!(1);
            out.push(name);
            return Self(out, None).converting(core);
        }
        if kind == ids::daemonsets() {
            return builtin(vec![
                ("Desired", "integer", 0, "The total number of nodes that should be running the daemon pod (including nodes correctly running the daemon pod).", |o| json!(int_at(o, "/status/desiredNumberScheduled"))),
                ("Current", "integer", 0, "The number of nodes that are running at least 1 daemon pod and are supposed to run the daemon pod.", |o| json!(int_at(o, "/status/currentNumberScheduled"))),
                ("Ready", "integer", 0, "numberReady is the number of nodes that should be running the daemon pod and have one or more of the daemon pod running with a Ready Condition.", |o| json!(int_at(o, "/status/numberReady"))),
                ("Up-to-date", "integer", 0, "The total number of nodes that are running updated daemon pod", |o| json!(int_at(o, "/status/updatedNumberScheduled"))),
                ("Available", "integer", 0, "The number of nodes that should be running the daemon pod and have one or more of the daemon pod running and available (ready for at least spec.minReadySeconds)", |o| json!(int_at(o, "/status/numberAvailable"))),
                ("Node Selector", "string", 0, "NodeSelector is a selector which must be true for the pod to fit on a node. Selector which must match a node's labels for the pod to be scheduled on that node.", |o| json!(format_labels(o.pointer("/spec/template/spec/nodeSelector")))),
                ("Age", "", 0, "", |_| Value::Null),
                ("Containers", "string", 1, "Names of each container in the template.", containers),
                ("Images", "string", 1, "Images referenced by each container in the template.", images),
                ("Selector", "string", 1, "A label query over pods that are managed by the daemon set.", |o| json!(format_labels(o.pointer("/spec/selector/matchLabels")))),
            ]);
        }
        if let Some(crd) = crd_for(st, kind) {
            // A CRD without printer columns gets Age, as the real server serves it.
            let default_age = [json!({"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp", "description": AGE_DOC})];
            let columns = printer_columns(crd, k.version).map_or(&default_age[..], |c| &c[..]);
            let mut out = vec![name_column()];
            for c in columns {
                let name = c.get("name").and_then(Value::as_str).unwrap_or_default();
                let path = c.get("jsonPath").and_then(Value::as_str).unwrap_or_default();
                let typ = c.get("type").and_then(Value::as_str).unwrap_or("string");
                let description = c
                    .get("description")
                    .and_then(Value::as_str)
                    .filter(|d| !d.is_empty())
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("Custom resource definition column (in JSONPath format): {path}"));
                out.push(Column {
                    def: json!({
                        "name": name, "type": typ, "format": c.get("format").and_then(Value::as_str).unwrap_or(""),
                        "description": description, "priority": c.get("priority").and_then(Value::as_i64).unwrap_or(0),
                    }),
                    cell: Cell::Path(parse_path(path), typ.to_string()),
                });
            }
            return Self(out, None);
        }
        Self(vec![name_column(), age_column()], None)
    }

    /// Cells computed from the object as `convert` shows it.
    fn converting(mut self, convert: fn(&Value) -> Value) -> Self {
        self.1 = Some(convert);
        self
    }

    /// A Table of `items`; `headers` false leaves out the column definitions
    /// (watch events after the first, as the real server does).
    pub(crate) fn table(&self, items: &[Value], meta: Value, headers: bool, include: Include) -> Value {
        let defs: Vec<Value> = if headers { self.0.iter().map(|c| c.def.clone()).collect() } else { Vec::new() };
        let rows: Vec<Value> = items
            .iter()
            .map(|o| {
                let shown = self.1.map(|convert| convert(o));
                let cells: Vec<Value> = self.0.iter().map(|c| cell(&c.cell, shown.as_ref().unwrap_or(o))).collect();
                let object = match include {
                    Include::None => Value::Null,
                    Include::Metadata => metadata_only(o),
                    Include::Object => o.clone(),
                };
                json!({"cells": cells, "object": object})
            })
            .collect();
        json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": meta, "columnDefinitions": defs, "rows": rows})
    }
}

/// An object as `PartialObjectMetadata`.
pub(crate) fn metadata_only(obj: &Value) -> Value {
    json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj.get("metadata").cloned().unwrap_or_else(|| json!({}))})
}

/// The stored CRD that defines `kind`, if any.
pub(crate) fn crd_for(st: &Store, kind: KindId) -> Option<&Value> {
    let k = &KINDS[kind];
    st.objects[ids::crds()].values().find(|crd| {
        crd.pointer("/spec/group").and_then(Value::as_str) == Some(k.group)
            && crd.pointer("/spec/names/plural").and_then(Value::as_str) == Some(k.plural)
    })
}

/// The CRD's version entry named `version`.
pub(crate) fn crd_version<'a>(crd: &'a Value, version: &str) -> Option<&'a Value> {
    crd.pointer("/spec/versions")?.as_array()?.iter().find(|v| v.get("name").and_then(Value::as_str) == Some(version))
}

fn printer_columns<'a>(crd: &'a Value, version: &str) -> Option<&'a Vec<Value>> {
    crd_version(crd, version)?.get("additionalPrinterColumns")?.as_array().filter(|c| !c.is_empty())
}

fn cell(c: &Cell, o: &Value) -> Value {
    match c {
        Cell::Name => o.pointer("/metadata/name").cloned().unwrap_or(Value::Null),
        Cell::Age => json!(age(o.pointer("/metadata/creationTimestamp").and_then(Value::as_str))),
        Cell::Builtin(f) => f(o),
        Cell::Path(None, _) => Value::Null,
        Cell::Path(Some(steps), typ) => {
            let Some(v) = eval(steps, o).into_iter().next() else { return Value::Null };
            match (typ.as_str(), v) {
                (_, Value::Null) => Value::Null,
                ("string", Value::String(s)) => json!(s),
                // Numbers, booleans; objects and arrays as JSON (the real
                // server prints those as Go does, e.g. `map[a:b]`).
                ("string", v) => json!(v.to_string()),
                ("integer", Value::Number(n)) => n.as_i64().map(|i| json!(i)).or_else(|| n.as_f64().map(|f| json!(f as i64))).unwrap_or(Value::Null),
                ("number", Value::Number(n)) => n.as_f64().map(|f| json!(f)).unwrap_or(Value::Null),
                ("boolean", Value::Bool(b)) => json!(b),
                ("date", Value::String(s)) => match s.parse::<k8s_openapi::jiff::Timestamp>() {
                    Ok(_) => json!(age(Some(&s))),
                    Err(_) => json!("<invalid>"),
                },
                _ => Value::Null,
            }
        }
    }
}

// ---- built-in printers ----

fn str_at<'a>(o: &'a Value, ptr: &str) -> Option<&'a str> {
    o.pointer(ptr).and_then(Value::as_str)
}

fn int_at(o: &Value, ptr: &str) -> i64 {
    o.pointer(ptr).and_then(Value::as_i64).unwrap_or(0)
}

fn non_empty(s: Option<&str>) -> &str {
    s.filter(|s| !s.is_empty()).unwrap_or("<none>")
}

/// `a=b,c=d` in key order, or `<none>`.
fn format_labels(m: Option<&Value>) -> String {
    let pairs: Vec<String> = m
        .and_then(Value::as_object)
        .map(|m| m.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default())).collect())
        .unwrap_or_default();
    if pairs.is_empty() { "<none>".into() } else { pairs.join(",") }
}

fn strings(o: &Value, ptr: &str) -> Vec<String> {
    o.pointer(ptr).and_then(Value::as_array).map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect()).unwrap_or_default()
}

fn service_external_ips(o: &Value) -> Value {
    let external = strings(o, "/spec/externalIPs");
    let joined = |v: Vec<String>| if v.is_empty() { "<none>".to_string() } else { v.join(",") };
    json!(match str_at(o, "/spec/type").unwrap_or("ClusterIP") {
        "LoadBalancer" => {
            let mut ips: Vec<String> = o
                .pointer("/status/loadBalancer/ingress")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(|i| i.get("ip").or_else(|| i.get("hostname")).and_then(Value::as_str)).map(str::to_string).collect())
                .unwrap_or_default();
            ips.extend(external);
            if ips.is_empty() { "<pending>".to_string() } else { ips.join(",") }
        }
        "ExternalName" => str_at(o, "/spec/externalName").unwrap_or("<none>").to_string(),
        _ => joined(external),
    })
}

fn service_ports(o: &Value) -> Value {
    let ports: Vec<String> = o
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .map(|ps| {
            ps.iter()
                .map(|p| {
                    let port = p.get("port").and_then(Value::as_i64).unwrap_or(0);
                    let proto = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
                    match p.get("nodePort").and_then(Value::as_i64).filter(|n| *n > 0) {
                        Some(n) => format!("{port}:{n}/{proto}"),
                        None => format!("{port}/{proto}"),
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    json!(if ports.is_empty() { "<none>".to_string() } else { ports.join(",") })
}

fn ready_condition(o: &Value) -> bool {
    o.pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|cs| cs.iter().any(|c| c.get("type").and_then(Value::as_str) == Some("Ready") && c.get("status").and_then(Value::as_str) == Some("True")))
}

fn pod_ready(o: &Value) -> Value {
    let total = o.pointer("/spec/containers").and_then(Value::as_array).map(Vec::len).unwrap_or(0);
    let ready = if ready_condition(o) { total } else { 0 };
    json!(format!("{ready}/{total}"))
}

fn pod_status(o: &Value) -> Value {
    if o.pointer("/metadata/deletionTimestamp").is_some() {
        return json!("Terminating");
    }
    json!(str_at(o, "/status/reason").or_else(|| str_at(o, "/status/phase")).unwrap_or("Pending"))
}

fn containers(o: &Value) -> Value {
    json!(template_containers(o, "name"))
}

fn images(o: &Value) -> Value {
    json!(template_containers(o, "image"))
}

fn template_containers(o: &Value, field: &str) -> String {
    o.pointer("/spec/template/spec/containers")
        .and_then(Value::as_array)
        .map(|cs| cs.iter().filter_map(|c| c.get(field).and_then(Value::as_str)).collect::<Vec<_>>().join(","))
        .unwrap_or_default()
}

fn micro_or_time(o: &Value, ptr: &str) -> Option<String> {
    str_at(o, ptr).filter(|t| !t.is_empty()).map(|t| age(Some(t)))
}

fn event_first_seen(o: &Value) -> Value {
    json!(micro_or_time(o, "/firstTimestamp").or_else(|| micro_or_time(o, "/eventTime")).unwrap_or_else(|| "<unknown>".into()))
}

fn event_last_seen(o: &Value) -> Value {
    if o.get("series").is_some_and(Value::is_object) {
        return json!(micro_or_time(o, "/series/lastObservedTime").unwrap_or_else(|| "<unknown>".into()));
    }
    micro_or_time(o, "/lastTimestamp").map(|a| json!(a)).unwrap_or_else(|| event_first_seen(o))
}

fn event_count(o: &Value) -> Value {
    let n = o.pointer("/series/count").or_else(|| o.get("count")).and_then(Value::as_i64).filter(|n| *n > 0).unwrap_or(1);
    json!(n.to_string())
}

fn event_object(o: &Value) -> Value {
    let kind = str_at(o, "/involvedObject/kind").unwrap_or_default().to_lowercase();
    json!(match str_at(o, "/involvedObject/name").filter(|n| !n.is_empty()) {
        Some(name) => format!("{kind}/{name}"),
        None => kind,
    })
}

fn event_source(o: &Value) -> Value {
    let first = |a: &str, b: &str| str_at(o, a).filter(|s| !s.is_empty()).or_else(|| str_at(o, b)).unwrap_or_default().to_string();
    let component = first("/source/component", "/reportingComponent");
    let instance = first("/source/host", "/reportingInstance");
    json!(if instance.is_empty() { component } else { format!("{component}, {instance}") })
}

// ---- ages ----

/// How long ago `ts` was, as kubectl prints ages (apimachinery's
/// `duration.HumanDuration`).
pub(crate) fn age(ts: Option<&str>) -> String {
    let Some(then) = ts.and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok()) else { return "<unknown>".into() };
    human_duration(k8s_openapi::jiff::Timestamp::now().as_second() - then.as_second())
}

/// apimachinery's `duration.HumanDuration`, for whole seconds.
pub(crate) fn human_duration(secs: i64) -> String {
    if secs < -1 {
        return "<invalid>".into();
    }
    if secs < 0 {
        return "0s".into();
    }
    if secs < 120 {
        return format!("{secs}s");
    }
    let minutes = secs / 60;
    if minutes < 10 {
        let s = secs % 60;
        return if s == 0 { format!("{minutes}m") } else { format!("{minutes}m{s}s") };
    }
    if minutes < 180 {
        return format!("{minutes}m");
    }
    let hours = secs / 3600;
    if hours < 8 {
        let m = minutes % 60;
        return if m == 0 { format!("{hours}h") } else { format!("{hours}h{m}m") };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    if hours < 24 * 8 {
        let h = hours % 24;
        return if h == 0 { format!("{}d", hours / 24) } else { format!("{}d{h}h", hours / 24) };
    }
    if hours < 24 * 365 * 2 {
        return format!("{}d", hours / 24);
    }
    if hours < 24 * 365 * 8 {
        let dy = (hours / 24) % 365;
        return if dy == 0 { format!("{}y", hours / 24 / 365) } else { format!("{}y{dy}d", hours / 24 / 365) };
    }
    format!("{}y", hours / 24 / 365)
}

// ---- JSONPath, the subset printer columns use ----

#[derive(Debug, Clone, PartialEq)]
enum Step {
    Field(String),
    Index(i64),
    All,
    /// `[?(@.a.b == value)]` (or `!=`); `None` value: the field exists.
    Filter(Vec<String>, bool, Option<Value>),
}

/// Parses `.a.b[0].c[*].d[?(@.type=="Ready")].status` (with or without the
/// surrounding `{}`); `None` for anything else.
fn parse_path(path: &str) -> Option<Vec<Step>> {
    let p = path.trim();
    let p = p.strip_prefix('{').and_then(|p| p.strip_suffix('}')).unwrap_or(p);
    let p = p.strip_prefix('$').unwrap_or(p);
    let mut steps = Vec::new();
    let mut rest = p;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('.') {
            // A name runs to the next `.` or `[`; `\.` is a dot in it (a
            // label key: `.metadata.labels.codesink\.net/weighted-service`).
            let mut name = String::new();
            let mut end = r.len();
            let mut chars = r.char_indices();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => name.push(chars.next()?.1),
                    '.' | '[' => {
                        end = i;
                        break;
                    }
                    c => name.push(c),
                }
            }
            match name.as_str() {
                "" => return None,
                "*" if !r.starts_with('\\') => steps.push(Step::All),
                _ => steps.push(Step::Field(name)),
            }
            rest = &r[end..];
        } else if let Some(r) = rest.strip_prefix("[?(") {
            let end = r.find(")]")?;
            steps.push(parse_filter(&r[..end])?);
            rest = &r[end + 2..];
        } else if let Some(r) = rest.strip_prefix('[') {
            let end = r.find(']')?;
            let inner = r[..end].trim();
            if inner == "*" {
                steps.push(Step::All);
            } else if let Some(q) = inner.strip_prefix('\'').and_then(|q| q.strip_suffix('\'')) {
                steps.push(Step::Field(q.to_string()));
            } else {
                steps.push(Step::Index(inner.parse().ok()?));
            }
            rest = &r[end + 1..];
        } else {
            return None;
        }
    }
    Some(steps)
}

fn parse_filter(f: &str) -> Option<Step> {
    let f = f.trim();
    let (lhs, eq, rhs) = if let Some((l, r)) = f.split_once("==") {
        (l, true, Some(r))
    } else if let Some((l, r)) = f.split_once("!=") {
        (l, false, Some(r))
    } else {
        (f, true, None)
    };
    let fields: Vec<String> = lhs.trim().strip_prefix("@.")?.split('.').map(str::to_string).collect();
    let value = match rhs.map(str::trim) {
        None => None,
        Some(r) => Some(
            if let Some(s) = r.strip_prefix('"').and_then(|s| s.strip_suffix('"')).or_else(|| r.strip_prefix('\'').and_then(|s| s.strip_suffix('\''))) {
                json!(s)
            } else {
                serde_json::from_str(r).ok()?
            },
        ),
    };
    Some(Step::Filter(fields, eq, value))
}

fn eval(steps: &[Step], root: &Value) -> Vec<Value> {
    let mut cur = vec![root.clone()];
    for step in steps {
        let mut next = Vec::new();
        for v in cur {
            match step {
                Step::Field(n) => next.extend(v.get(n).cloned()),
                Step::Index(i) => {
                    if let Some(a) = v.as_array() {
                        let idx = if *i < 0 { a.len() as i64 + i } else { *i };
                        next.extend(usize::try_from(idx).ok().and_then(|i| a.get(i)).cloned());
                    }
                }
                Step::All => match v {
                    Value::Array(a) => next.extend(a),
                    Value::Object(m) => next.extend(m.into_iter().map(|(_, v)| v)),
                    _ => {}
                },
                Step::Filter(fields, eq, want) => {
                    for item in v.as_array().into_iter().flatten() {
                        let mut got = Some(item);
                        for f in fields {
                            got = got.and_then(|g| g.get(f));
                        }
                        let keep = match want {
                            None => got.is_some(),
                            Some(w) => (got == Some(w)) == *eq,
                        };
                        if keep {
                            next.push(item.clone());
                        }
                    }
                }
            }
        }
        cur = next;
    }
    cur
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn printer_column_paths() {
        let ws = json!({"status": {"serviceName": "example", "conditions": [
            {"type": "PolicyReady", "status": "False"}, {"type": "Ready", "status": "True"}], "n": 3}});
        let get = |p: &str| eval(&parse_path(p).expect(p), &ws);
        assert_eq!(get(".status.serviceName"), [json!("example")]);
        assert_eq!(get(r#".status.conditions[?(@.type=="Ready")].status"#), [json!("True")]);
        assert_eq!(get(".status.conditions[0].type"), [json!("PolicyReady")]);
        assert_eq!(get(".status.conditions[*].type"), [json!("PolicyReady"), json!("Ready")]);
        assert_eq!(get("{.status.n}"), [json!(3)]);
        let slice = json!({"metadata": {"labels": {"codesink.net/weighted-service": "web", "a.b": {"c": 1}}}});
        let get_slice = |p: &str| eval(&parse_path(p).expect(p), &slice);
        assert_eq!(get_slice(r".metadata.labels.codesink\.net/weighted-service"), [json!("web")]);
        assert_eq!(get_slice(r".metadata.labels.a\.b.c"), [json!(1)]);
        assert!(get_slice(".metadata.labels.codesink.net/weighted-service").is_empty(), "unescaped, the dot separates");
        assert!(parse_path(r".a\").is_none(), "a trailing backslash escapes nothing");
        assert!(get(".status.missing").is_empty());
        assert!(parse_path(".a[").is_none());
        let typed = |typ: &str, p: &str| cell(&Cell::Path(parse_path(p), typ.to_string()), &ws);
        assert_eq!(typed("integer", ".status.n"), json!(3));
        assert_eq!(typed("string", ".status.n"), json!("3"));
        assert_eq!(typed("string", ".status.nothing"), Value::Null);
    }

    #[test]
    fn human_durations_as_kubectl_prints_them() {
        for (secs, want) in [(-5, "<invalid>"), (-1, "0s"), (59, "59s"), (119, "119s"), (125, "2m5s"), (600, "10m"), (3 * 3600 + 60, "3h1m"),
            (10 * 3600, "10h"), (50 * 3600, "2d2h"), (30 * 86400, "30d"), (800 * 86400, "2y70d")]
        {
            assert_eq!(human_duration(secs), want, "{secs}");
        }
    }
}
