//! Offline evaluation (`ipvs-operator eval`): a WeightedService and a file of
//! Pods in, the weights a policy gives each destination out — like `opa eval`,
//! for users checking a split and for policy authors.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::crd::WeightedService;
use crate::policy::{Evaluation, LoadedPolicy, PolicyError};
use crate::snapshot::{NodeInfo, Snapshot, ZONE_LABEL};
use crate::summary::{group_shares, selector_text};

/// Why the input files could not be used.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Not YAML, or an object that does not fit its type.
    #[error("{path}: {message}")]
    Yaml {
        /// The file.
        path: PathBuf,
        /// What and where (line and column, field path).
        message: String,
    },
    /// No WeightedService in the file.
    #[error("{path}: no WeightedService (kind: WeightedService) in this file")]
    NoWeightedService {
        /// The file.
        path: PathBuf,
    },
    /// Several, and no `--name` to choose.
    #[error("{path}: several WeightedServices ({names}); choose one with --name")]
    Ambiguous {
        /// The file.
        path: PathBuf,
        /// Their names.
        names: String,
    },
    /// `--name` names none of them.
    #[error("{path}: no WeightedService named {name:?} (there are: {names})")]
    NameNotFound {
        /// The file.
        path: PathBuf,
        /// The name asked for.
        name: String,
        /// The names there are.
        names: String,
    },
}

/// The objects of interest in a YAML file.
#[derive(Debug, Default)]
pub struct Objects {
    /// WeightedServices.
    pub weighted_services: Vec<WeightedService>,
    /// Pods.
    pub pods: Vec<Pod>,
    /// Nodes (used for zones and the `--node` view).
    pub nodes: Vec<Node>,
    /// Kinds that were present but are not used here (e.g. Deployment, Ingress).
    pub ignored_kinds: Vec<String>,
}

#[derive(Deserialize)]
struct List {
    #[serde(default)]
    items: Vec<serde_json::Value>,
}

/// One document of a file, typed by its kind.
enum Document {
    Pod(Box<Pod>),
    Node(Box<Node>),
    WeightedService(Box<WeightedService>),
    /// A `List`, `PodList` or `NodeList`: its kind and items.
    List(String, Vec<serde_json::Value>),
    /// Another kind (empty: none), or an empty document.
    Other(String),
}

std::thread_local! {
    /// The kinds of the documents still to be typed, in order: a document's
    /// kind decides its type, but the YAML reader hands a type one document
    /// at a time (see [`parse_objects`]).
    static KINDS_AHEAD: std::cell::RefCell<std::collections::VecDeque<String>> = Default::default();
}

impl<'de> Deserialize<'de> for Document {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let kind = KINDS_AHEAD.with(|k| k.borrow_mut().pop_front()).unwrap_or_default();
        Ok(match kind.as_str() {
            "Pod" => Document::Pod(with_path(d)?),
            "Node" => Document::Node(with_path(d)?),
            "WeightedService" => Document::WeightedService(with_path(d)?),
            "List" | "PodList" | "NodeList" => Document::List(kind, with_path::<List, D>(d)?.items),
            _ => {
                serde::de::IgnoredAny::deserialize(d)?;
                Document::Other(kind)
            }
        })
    }
}

/// `T` from `d`, its error prefixed with the path of the offending field.
fn with_path<'de, T: Deserialize<'de>, D: serde::Deserializer<'de>>(d: D) -> Result<T, D::Error> {
    serde_path_to_error::deserialize(d).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match path.as_str() {
            "." => inner,
            _ => serde::de::Error::custom(format!("{path}: {inner}")),
        }
    })
}

/// How YAML files of the user's are read: the reader's budget (1,024
/// documents, 250,000 nodes) guards against hostile input, and a file here is
/// one the user chose, e.g. `kubectl get pods -o yaml` of a large cluster.
pub fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_documents: 1 << 20,
            max_nodes: 1 << 26,
            max_events: 1 << 28,
        },
    }
}

/// Read every document of a YAML file (`---`-separated), unfolding `List`s (what
/// `kubectl get … -o yaml` prints), and keep WeightedServices, Pods and Nodes.
/// Errors carry the line and the path of the offending field.
pub fn read_objects(path: &Path) -> Result<Objects, InputError> {
    let text = std::fs::read_to_string(path).map_err(|source| InputError::Read {
        path: path.into(),
        source,
    })?;
    parse_objects(&text, path)
}

/// [`read_objects`] of a file's text; `path` names the file in errors.
pub fn parse_objects(text: &str, path: &Path) -> Result<Objects, InputError> {
    // The reader's messages start with "error: ", which the CLI says already.
    let yaml_error = |message: String| InputError::Yaml {
        path: path.into(),
        message: message.strip_prefix("error: ").map(str::to_string).unwrap_or(message),
    };
    // Twice through the text, each in linear time: the documents' kinds, then
    // each document typed by its kind straight from the text, so that an error
    // has a line and column (a document read into a value first has none).
    let values: Vec<serde_json::Value> =
        serde_saphyr::from_multiple_with_options(text, yaml_options()).map_err(|e| yaml_error(e.to_string()))?;
    let kinds: std::collections::VecDeque<String> =
        values.iter().map(|v| v["kind"].as_str().unwrap_or_default().to_string()).collect();
    let count = kinds.len();
    KINDS_AHEAD.with(|k| *k.borrow_mut() = kinds);
    let documents = serde_saphyr::from_multiple_with_options::<Document>(text, yaml_options());
    let typed_so_far = count - KINDS_AHEAD.with(|k| std::mem::take(&mut *k.borrow_mut()).len());
    let documents = documents.map_err(|e| yaml_error(format!("document {typed_so_far}: {}", e.to_string().trim_start_matches("error: "))))?;
    let mut objects = Objects::default();
    for (index, document) in documents.into_iter().enumerate() {
        match document {
            Document::Pod(pod) => objects.pods.push(*pod),
            Document::Node(node) => objects.nodes.push(*node),
            Document::WeightedService(ws) => objects.weighted_services.push(*ws),
            Document::Other(kind) if kind.is_empty() && values.get(index).is_none_or(serde_json::Value::is_null) => {}
            Document::Other(kind) => {
                objects.ignored_kinds.push(if kind.is_empty() { "(no kind)".into() } else { kind })
            }
            Document::List(kind, items) => {
                // Items of a PodList may omit their kind; those of a List carry it.
                let default_kind = kind.strip_suffix("List").unwrap_or_default();
                for (i, item) in items.into_iter().enumerate() {
                    let item_kind = item["kind"].as_str().filter(|k| !k.is_empty()).unwrap_or(default_kind).to_string();
                    let at = |e: serde_path_to_error::Error<serde_json::Error>| {
                        yaml_error(format!("document {}: items[{i}].{}: {}", index + 1, e.path(), e.inner()))
                    };
                    match item_kind.as_str() {
                        "Pod" => objects.pods.push(serde_path_to_error::deserialize(item).map_err(at)?),
                        "Node" => objects.nodes.push(serde_path_to_error::deserialize(item).map_err(at)?),
                        "WeightedService" => {
                            objects.weighted_services.push(serde_path_to_error::deserialize(item).map_err(at)?)
                        }
                        other => objects.ignored_kinds.push(other.to_string()),
                    }
                }
            }
        }
    }
    Ok(objects)
}

/// Pick the WeightedService to evaluate from a file: the only one, or the one named.
pub fn choose_weighted_service(
    path: &Path,
    mut found: Vec<WeightedService>,
    name: Option<&str>,
) -> Result<WeightedService, InputError> {
    let names = || {
        found
            .iter()
            .map(|w| w.metadata.name.clone().unwrap_or_default())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match (found.len(), name) {
        (0, _) => Err(InputError::NoWeightedService { path: path.into() }),
        (1, None) => Ok(found.remove(0)),
        (_, None) => Err(InputError::Ambiguous {
            path: path.into(),
            names: names(),
        }),
        (_, Some(name)) => match found.iter().position(|w| w.metadata.name.as_deref() == Some(name)) {
            Some(i) => Ok(found.remove(i)),
            None => Err(InputError::NameNotFound {
                path: path.into(),
                name: name.into(),
                names: names(),
            }),
        },
    }
}

/// The evaluating node: `name`, with its zone and labels if the file has that Node.
pub fn node_info(name: &str, nodes: &[Node]) -> NodeInfo {
    let labels = nodes
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(name))
        .and_then(|n| n.metadata.labels.clone())
        .unwrap_or_default();
    NodeInfo {
        name: name.into(),
        zone: labels.get(ZONE_LABEL).cloned(),
        labels,
    }
}

/// Fill in each endpoint's zone from its node's `topology.kubernetes.io/zone` label.
pub fn add_zones(snapshot: &mut Snapshot, nodes: &[Node]) {
    for endpoint in &mut snapshot.endpoints {
        endpoint.zone = endpoint.node_name.as_deref().and_then(|node| {
            nodes
                .iter()
                .find(|n| n.metadata.name.as_deref() == Some(node))
                .and_then(|n| n.metadata.labels.as_ref())
                .and_then(|l| l.get(ZONE_LABEL).cloned())
        });
    }
}

/// What `eval` prints (`-o json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// The policy evaluated.
    pub policy: PolicyId,
    /// One row per endpoint per Service port, sorted by pod then port.
    pub weights: Vec<WeightRow>,
    /// Per group: endpoints and expected share of new connections.
    pub groups: Vec<GroupRow>,
    /// The policy's message.
    pub message: Option<String>,
    /// When the policy asks to be evaluated again, in seconds.
    pub requeue_after_seconds: Option<f64>,
}

/// Name and hash of a policy module.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PolicyId {
    /// Name.
    pub name: String,
    /// SHA-256 of the module, hex.
    pub sha256: String,
}

/// The weight of one IPVS destination.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct WeightRow {
    /// The pod.
    pub pod: String,
    /// Its IP.
    pub ip: String,
    /// The destination port (the resolved target port).
    pub port: u16,
    /// The Service port it serves.
    pub service_port: u16,
    /// TCP, UDP or SCTP.
    pub protocol: String,
    /// The weight.
    pub weight: u16,
}

/// One group's part of the split.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GroupRow {
    /// `env=prod`, or `(no group)`.
    pub selector: String,
    /// Ready endpoints.
    pub endpoints: u32,
    /// Expected share of new connections, 0..=1.
    pub share: f64,
}

/// Evaluate `policy` on `snapshot` and lay the result out per destination.
pub fn evaluate(policy: &LoadedPolicy, snapshot: &Snapshot) -> Result<Report, PolicyError> {
    let evaluation = policy.evaluate(snapshot)?;
    Ok(report(policy.name(), policy.sha256(), snapshot, &evaluation))
}

/// Lay out an evaluation per destination.
pub fn report(name: &str, sha256: &str, snapshot: &Snapshot, evaluation: &Evaluation) -> Report {
    let mut weights: Vec<WeightRow> = snapshot
        .endpoints
        .iter()
        .zip(&evaluation.weights)
        .flat_map(|(endpoint, weight)| {
            endpoint.ports.iter().map(move |port| WeightRow {
                pod: endpoint.pod_name.clone().unwrap_or_default(),
                ip: endpoint.address.to_string(),
                port: port.target_port,
                service_port: port.service_port,
                protocol: port.protocol.to_string(),
                weight: *weight,
            })
        })
        .collect();
    weights.sort_by(|a, b| (&a.pod, a.port, a.service_port).cmp(&(&b.pod, b.port, b.service_port)));
    let groups = group_shares(snapshot, &evaluation.weights)
        .iter()
        .map(|g| GroupRow {
            selector: selector_text(g),
            endpoints: g.endpoints,
            share: g.share,
        })
        .collect();
    Report {
        policy: PolicyId {
            name: name.into(),
            sha256: sha256.into(),
        },
        weights,
        groups,
        message: evaluation.message.clone(),
        requeue_after_seconds: evaluation.requeue_after.map(|d| d.as_secs_f64()),
    }
}

/// The report for people.
pub fn render_table(report: &Report, snapshot: &Snapshot, now: Timestamp) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "WeightedService {}/{} — policy {} (sha256 {}…) at {}",
        snapshot.service.namespace,
        snapshot.service.name,
        report.policy.name,
        &report.policy.sha256[..12.min(report.policy.sha256.len())],
        now
    );
    let mut table = vec![["POD", "IP", "PORT", "SERVICE-PORT", "PROTOCOL", "WEIGHT"].map(String::from).to_vec()];
    for row in &report.weights {
        table.push(vec![
            row.pod.clone(),
            row.ip.clone(),
            row.port.to_string(),
            row.service_port.to_string(),
            row.protocol.clone(),
            row.weight.to_string(),
        ]);
    }
    out.push('\n');
    out.push_str(&columns(&table));
    let mut groups = vec![["GROUP", "READY-ENDPOINTS", "SHARE"].map(String::from).to_vec()];
    for g in &report.groups {
        groups.push(vec![g.selector.clone(), g.endpoints.to_string(), format!("{:.1}%", g.share * 100.0)]);
    }
    out.push('\n');
    out.push_str(&columns(&groups));
    if let Some(message) = &report.message {
        let _ = writeln!(out, "\nmessage: {message}");
    }
    if let Some(s) = report.requeue_after_seconds {
        let _ = writeln!(out, "evaluate again in: {s:.0}s");
    }
    out
}

/// Left-aligned columns separated by three spaces, like kubectl.
pub fn columns(rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..rows.first().map_or(0, Vec::len))
        .map(|c| rows.iter().map(|r| r.get(c).map_or(0, |s| s.chars().count())).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, cell)| format!("{cell:<width$}", width = widths[c]))
            .collect();
        let _ = writeln!(out, "{}", line.join("   ").trim_end());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn reads_a_kubectl_list_and_multi_document_files() {
        let list = file(
            "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Pod\n  metadata: {name: a}\n- apiVersion: v1\n  kind: Node\n  metadata: {name: n1}\nmetadata: {resourceVersion: \"\"}\n",
        );
        let objects = read_objects(list.path()).unwrap();
        assert_eq!(objects.pods.len(), 1);
        assert_eq!(objects.nodes.len(), 1);

        let docs = file("apiVersion: v1\nkind: Pod\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: b}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n");
        let objects = read_objects(docs.path()).unwrap();
        assert_eq!(objects.pods.len(), 2);
        assert_eq!(objects.ignored_kinds, vec!["Deployment".to_string()]);
    }

    #[test]
    fn a_syntax_error_names_the_line() {
        let bad = file("apiVersion: v1\nkind: Pod\nmetadata: {name: a\n");
        let e = read_objects(bad.path()).unwrap_err().to_string();
        assert!(e.contains("line"), "{e}");
    }

    #[test]
    fn a_type_error_names_the_line_and_field() {
        let bad = file("apiVersion: v1\nkind: Pod\nmetadata: {name: a}\n---\napiVersion: codesink.net/v1alpha1\nkind: WeightedService\nmetadata: {name: w}\nspec:\n  weights:\n  - weight: ten\n");
        let e = read_objects(bad.path()).unwrap_err().to_string();
        assert!(e.contains("document 2"), "{e}");
        assert!(e.contains("spec.weights[0].weight"), "{e}");
        assert!(e.contains("line 10"), "{e}");
    }

    #[test]
    fn a_file_of_many_documents_reads_in_linear_time() {
        // Found fuzzing the reader: each typed document was parsed again from
        // the top of the file, so n documents cost n² (8,000 small pods took a minute).
        let docs: Vec<String> = (0..8000).map(|i| format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}}}\n")).collect();
        let started = std::time::Instant::now();
        let objects = parse_objects(&docs.join("---\n"), Path::new("pods.yaml")).unwrap();
        assert_eq!(objects.pods.len(), 8000);
        assert_eq!(objects.pods[7999].metadata.name.as_deref(), Some("p7999"));
        let took = started.elapsed();
        assert!(took < std::time::Duration::from_secs(10), "8,000 documents took {took:?}");
    }

    #[test]
    fn a_missing_file_says_so() {
        let e = read_objects(Path::new("/nonexistent/pods.yaml")).unwrap_err().to_string();
        assert!(e.starts_with("/nonexistent/pods.yaml: "), "{e}");
    }

    #[test]
    fn choosing_a_weighted_service() {
        let ws = |n: &str| {
            let mut w = WeightedService::new(n, Default::default());
            w.metadata.name = Some(n.into());
            w
        };
        let p = Path::new("f.yaml");
        assert!(matches!(choose_weighted_service(p, vec![], None), Err(InputError::NoWeightedService { .. })));
        assert!(matches!(choose_weighted_service(p, vec![ws("a"), ws("b")], None), Err(InputError::Ambiguous { .. })));
        assert_eq!(choose_weighted_service(p, vec![ws("a"), ws("b")], Some("b")).unwrap().metadata.name.as_deref(), Some("b"));
        assert!(matches!(choose_weighted_service(p, vec![ws("a")], Some("c")), Err(InputError::NameNotFound { .. })));
    }
}
