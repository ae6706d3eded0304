//! Offline evaluation (`ipvs-operator eval`): a WeightedService and a file of
//! Pods in, the weights a policy gives each destination out — like `opa eval`,
//! for users checking a split and for policy authors.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::jiff::Timestamp;
use serde::de::DeserializeOwned;
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
struct Kind {
    #[serde(default)]
    kind: String,
}

#[derive(Deserialize)]
struct List {
    #[serde(default)]
    items: Vec<serde_yaml::Value>,
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
    let yaml_error = |message: String| InputError::Yaml {
        path: path.into(),
        message,
    };
    let mut objects = Objects::default();
    // The same documents again, in step, for the typed reading: from the text,
    // so that errors have a line and column. Not `.nth(index)` of a fresh
    // parse per document, which made a file of n documents cost n² (2,000
    // pods as separate documents took 40 s).
    let mut again = serde_yaml::Deserializer::from_str(text);
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let typed_document = again.next();
        let value = serde_yaml::Value::deserialize(document)
            .map_err(|e| yaml_error(format!("document {}: {e}", index + 1)))?;
        if value.is_null() {
            continue;
        }
        let kind = serde_yaml::from_value::<Kind>(value.clone()).map(|k| k.kind).unwrap_or_default();
        match kind.as_str() {
            "List" | "PodList" | "NodeList" => {
                let list: List = typed(typed_document, index).map_err(yaml_error)?;
                // Items of a PodList may omit their kind; those of a List carry it.
                let default_kind = kind.strip_suffix("List").unwrap_or_default();
                for (i, item) in list.items.into_iter().enumerate() {
                    let item_kind = serde_yaml::from_value::<Kind>(item.clone())
                        .map(|k| k.kind)
                        .ok()
                        .filter(|k| !k.is_empty())
                        .unwrap_or_else(|| default_kind.to_string());
                    let at = |e: serde_path_to_error::Error<serde_yaml::Error>| {
                        yaml_error(format!("document {}: items[{i}].{}: {}", index + 1, e.path(), e.inner()))
                    };
                    match item_kind.as_str() {
                        "Pod" => objects.pods.push(serde_path_to_error::deserialize(item).map_err(at)?),
                        "Node" => objects.nodes.push(serde_path_to_error::deserialize(item).map_err(at)?),
                        "WeightedService" => objects
                            .weighted_services
                            .push(serde_path_to_error::deserialize(item).map_err(at)?),
                        other => objects.ignored_kinds.push(other.to_string()),
                    }
                }
            }
            "Pod" => objects.pods.push(typed(typed_document, index).map_err(yaml_error)?),
            "Node" => objects.nodes.push(typed(typed_document, index).map_err(yaml_error)?),
            "WeightedService" => objects.weighted_services.push(typed(typed_document, index).map_err(yaml_error)?),
            other => objects.ignored_kinds.push(if other.is_empty() { "(no kind)".into() } else { other.into() }),
        }
    }
    Ok(objects)
}

/// Deserialize document `index` as `T`, straight from the text so that the
/// error has a line and column, and the field path.
fn typed<T: DeserializeOwned>(document: Option<serde_yaml::Deserializer<'_>>, index: usize) -> Result<T, String> {
    let document = document
        .ok_or_else(|| format!("document {} disappeared", index + 1))?;
    serde_path_to_error::deserialize(document).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            format!("document {}: {inner}", index + 1)
        } else {
            format!("document {}: {path}: {inner}", index + 1)
        }
    })
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
