//! `ipvs-operator policy test`: a policy module run against case files, as
//! `opa test` runs a policy against its tests. Each file holds `cases:`, each
//! case a WeightedService, its Pods, optionally the evaluating Node and the
//! time, and what the policy must answer: weights by pod, or an error.
//!
//! ```yaml
//! cases:
//! - name: canary gets a tenth
//!   now: 2026-01-01T00:00:00Z          # optional; DEFAULT_NOW otherwise
//!   node: {metadata: {name: node-1}}   # optional: evaluate as that node's agent
//!   weightedService: {metadata: {name: web, namespace: default}, spec: {…}}
//!   pods: [{metadata: {…}, spec: {…}, status: {…}}]
//!   expect: {web-canary: 1, web-prod: 9}   # pods not named are not checked
//!   expectMessage: "…"                     # optional, exact
//!   expectRequeueAfterSeconds: 60          # optional
//! - name: a bad config is refused
//!   weightedService: …
//!   expectError: "unknown field"           # instead of expect: a substring
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::jiff::Timestamp;
use serde::Deserialize;

use crate::crd::WeightedService;
use crate::eval;
use crate::policy::LoadedPolicy;
use crate::snapshot::Snapshot;

/// The time a case without `now` is evaluated at: fixed, so that time-based
/// policies give the same answer on every run.
pub const DEFAULT_NOW: &str = "2026-01-01T00:00:00Z";

/// One file of cases.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseFile {
    /// The cases, run in order.
    pub cases: Vec<Case>,
}

/// One case.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Case {
    /// What it checks, for people.
    pub name: String,
    /// The WeightedService.
    pub weighted_service: WeightedService,
    /// Its Pods (those its selector matches are its endpoints).
    #[serde(default)]
    pub pods: Vec<Pod>,
    /// Evaluate as this node's agent does (default: the controller's cluster-wide view).
    #[serde(default)]
    pub node: Option<Node>,
    /// The time the policy sees (default [`DEFAULT_NOW`]).
    #[serde(default)]
    pub now: Option<Timestamp>,
    /// Weight by pod name; pods not named are not checked.
    #[serde(default)]
    pub expect: Option<BTreeMap<String, u16>>,
    /// Instead of `expect`: the policy must fail with an error containing this.
    #[serde(default)]
    pub expect_error: Option<String>,
    /// The policy's message, exactly.
    #[serde(default)]
    pub expect_message: Option<String>,
    /// When the policy asks to be evaluated again.
    #[serde(default)]
    pub expect_requeue_after_seconds: Option<f64>,
}

/// Why a case file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CaseFileError {
    /// It could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Not a case file.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What and where.
        message: String,
    },
}

/// Reads a case file; a case with both or neither of `expect` and
/// `expectError` is an error here, not a failed case.
pub fn read_case_file(path: &Path) -> Result<CaseFile, CaseFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| CaseFileError::Read { path: path.into(), source })?;
    let file: CaseFile = serde_saphyr::with_deserializer_from_str_with_options(&text, crate::eval::yaml_options(), |d| {
        serde_path_to_error::deserialize(d)
            .map_err(|e| serde::de::Error::custom(format!("{}: {}", e.path(), e.inner())))
    })
    .map_err(|e| CaseFileError::Parse { path: path.into(), message: e.to_string() })?;
    for (i, case) in file.cases.iter().enumerate() {
        if case.expect.is_some() == case.expect_error.is_some() {
            return Err(CaseFileError::Parse {
                path: path.into(),
                message: format!("cases[{i}] ({}): give exactly one of expect and expectError", case.name),
            });
        }
    }
    Ok(file)
}

/// Runs one case: `Ok` when the policy answered as expected, else what differed.
pub fn run_case(policy: &LoadedPolicy, case: &Case) -> Result<(), String> {
    let now = case.now.unwrap_or_else(|| DEFAULT_NOW.parse().unwrap_or(Timestamp::UNIX_EPOCH));
    let nodes: Vec<Node> = case.node.iter().cloned().collect();
    let node = case.node.as_ref().and_then(|n| n.metadata.name.as_deref()).map(|name| eval::node_info(name, &nodes));
    let (mut snapshot, _skipped) = Snapshot::from_pods(&case.weighted_service, &case.pods, node, now);
    eval::add_zones(&mut snapshot, &nodes);
    let report = match (eval::evaluate(policy, &snapshot), &case.expect_error) {
        (Err(error), Some(want)) if error.to_string().contains(want.as_str()) => return Ok(()),
        (Err(error), Some(want)) => return Err(format!("expected an error containing {want:?}, got: {error}")),
        (Err(error), None) => return Err(format!("the policy failed: {error}")),
        (Ok(report), Some(want)) => {
            return Err(format!("expected an error containing {want:?}, got weights {:?}", weights_by_pod(&report)));
        }
        (Ok(report), None) => report,
    };
    let got = weights_by_pod(&report);
    let mut differences = Vec::new();
    for (pod, want) in case.expect.iter().flatten() {
        match got.get(pod) {
            Some(weight) if weight == want => {}
            Some(weight) => differences.push(format!("{pod}: {weight}, expected {want}")),
            None => differences.push(format!("{pod}: not an endpoint, expected {want}")),
        }
    }
    if let Some(want) = &case.expect_message
        && report.message.as_deref() != Some(want.as_str())
    {
        differences.push(format!("message {:?}, expected {want:?}", report.message.as_deref().unwrap_or("")));
    }
    if let Some(want) = case.expect_requeue_after_seconds
        && report.requeue_after_seconds.is_none_or(|got| (got - want).abs() > 0.001)
    {
        differences.push(format!("requeue after {:?} s, expected {want} s", report.requeue_after_seconds));
    }
    if differences.is_empty() { Ok(()) } else { Err(differences.join("; ")) }
}

/// A pod's weight (the same on each of its ports).
fn weights_by_pod(report: &eval::Report) -> BTreeMap<String, u16> {
    report.weights.iter().map(|row| (row.pod.clone(), row.weight)).collect()
}
