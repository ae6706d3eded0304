//! The `WeightedService` custom resource (`codesink.net/v1alpha1`), in exactly
//! the format of the original ipvs-operator: a `ServiceSpec` inlined, plus
//! `scheduler` and `weights`. New here: the optional `policy` and a `status`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ServiceSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The policy used when `spec.policy` is absent.
pub const DEFAULT_POLICY: &str = "label-selector";

/// The scheduler used when `spec.scheduler` is absent or empty (as in the original).
pub const DEFAULT_SCHEDULER: &str = "wrr";

/// The IPVS schedulers of the Linux kernel, by the names ipvsadm and kube-proxy use.
pub const SCHEDULERS: &[&str] = &[
    "rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "fo", "ovf", "mh", "twos",
];

/// Schedulers under which a weight means only "zero or not": rr, lc and dh.
pub const WEIGHT_BLIND_SCHEDULERS: &[&str] = &["rr", "lc", "dh"];

/// Schedulers that hash connections to destinations: a weight-0 destination keeps
/// its slots there, so connections hashing to it fail.
pub const HASHING_SCHEDULERS: &[&str] = &["sh", "mh"];

/// A Service whose IPVS destinations get weights from a policy.
///
/// Every `ServiceSpec` field may appear in the spec, as in the original
/// ipvs-operator: the owned Service is created from them.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "codesink.net",
    version = "v1alpha1",
    kind = "WeightedService",
    plural = "weightedservices",
    shortname = "wsvc",
    doc = "A Service whose IPVS destinations get weights from a policy (ipvs-operator).",
    namespaced,
    status = "WeightedServiceStatus",
    printcolumn(name = "Service", type_ = "string", json_path = ".status.serviceName"),
    printcolumn(name = "Policy", type_ = "string", json_path = ".status.policy.name"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct WeightedServiceSpec {
    /// The Service to create, as a `ServiceSpec` (its fields are inlined).
    #[serde(flatten)]
    pub service: ServiceSpec,

    /// The IPVS scheduler for the Service's virtual services (default `wrr`).
    /// Only wrr, wlc, sed, nq, lblc, lblcr, sh and mh take weights into account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "scheduler_schema")]
    pub scheduler: Option<String>,

    /// Label groups in order: an endpoint takes the weight of the last group whose
    /// selector matches its pod's labels.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub weights: Vec<WeightGroup>,

    /// The policy that computes the weights (default: `label-selector`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyRef>,

    /// Who serves the Service's traffic: `kube-proxy` (the default: kube-proxy
    /// in IPVS mode makes the virtual services, ipvs-operator sets their
    /// weights) or `ipvs-operator` (its agents serve the Service themselves,
    /// and kube-proxy, in any mode, leaves it alone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<Proxy>,
}

/// `spec.proxy`: who makes the Service's virtual services.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum Proxy {
    /// kube-proxy, in IPVS mode, makes them; the agent sets weights and the scheduler.
    #[default]
    #[serde(rename = "kube-proxy")]
    KubeProxy,
    /// The agent makes them (standalone mode), on a cluster whose kube-proxy is
    /// in any mode, or has none.
    #[serde(rename = "ipvs-operator")]
    IpvsOperator,
}

/// The label kube-proxy (every mode) and common replacements read: a Service
/// that carries one is served by the proxy it names, not by them.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";

/// [`SERVICE_PROXY_NAME_LABEL`]'s value on Services the agents serve themselves.
pub const PROXY_NAME: &str = "ipvs-operator";

/// One entry of `spec.weights`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub struct WeightGroup {
    /// The IPVS weight of each matching endpoint (0..=65535).
    #[schemars(range(min = 0, max = 65535))]
    pub weight: u32,
    /// Pod labels that must all match (the Service selector is implied).
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
}

/// Which policy computes the weights, and its configuration.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRef {
    /// A built-in policy or a module in the policy directory (`NAME.wasm`):
    /// lowercase letters, digits and `-`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"), length(max = 63))]
    pub name: Option<String>,
    /// A version of the policy: the module `NAME.VERSION.wasm` in the policy
    /// directory, beside `NAME.wasm` (what is used when this is absent). A
    /// version that is not there is `PolicyNotFound`, never another version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[-_a-zA-Z0-9][-._a-zA-Z0-9]*$"), length(max = 63))]
    pub version: Option<String>,
    /// Free JSON handed to the policy. `"allowAllZero": true` lets it give every
    /// ready endpoint weight 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_json_schema")]
    pub config: Option<serde_json::Value>,
    /// Pin: the SHA-256 of the module's bytes (hex). A module that differs is not used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub sha256: Option<String>,
}

/// What the controller observed and decided.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WeightedServiceStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The name of the Service this WeightedService owns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_name: Option<String>,
    /// The policy in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyStatus>,
    /// `PolicyReady`, `ServiceReady`, `Ready`, and warnings (`SchedulerIgnoresWeights`,
    /// `ZeroWeightUnderHashing`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Per group of `spec.weights`: endpoints matched and their share of new connections.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<GroupStatus>,
    /// The policy's message, or the reason it could not be applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The policy a WeightedService uses.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct PolicyStatus {
    /// Its name.
    pub name: String,
    /// Its version (`spec.policy.version`), when one was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The SHA-256 of its module (hex).
    pub sha256: String,
}

/// One group's part of the split.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct GroupStatus {
    /// The group's selector; empty for the endpoints no group matches.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// The weight `spec.weights` gives the group; absent for the endpoints no group matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// Ready endpoints in the group.
    pub endpoints: u32,
    /// The group's expected share of new connections, 0..=1, from the weights decided.
    pub share: f64,
}

/// Pod entries per [`PodInfoSlice`], as EndpointSlices split at 100 endpoints.
pub const PODS_PER_SLICE: usize = 100;

/// What agents need of the pods behind one WeightedService, published by the
/// controller (which watches pods; agents do not): each pod's labels, creation
/// time and since when it has been Ready. Labelled with
/// `codesink.net/weighted-service` and owned by the WeightedService (deleting
/// it collects them); split at 100 pods, and written only when this content
/// changes, so pod status churn reaches no agent.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "codesink.net",
    version = "v1alpha1",
    kind = "PodInfoSlice",
    plural = "podinfoslices",
    doc = "What ipvs-operator's agents need of the pods behind a WeightedService (written by its controller).",
    namespaced,
    printcolumn(name = "WeightedService", type_ = "string", json_path = ".metadata.labels.codesink\\.net/weighted-service"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct PodInfoSliceSpec {
    /// The distinct label sets of the slice's pods, each written once: the
    /// pods of a Deployment share theirs, and a slice is sent whole to every
    /// node at each change of one pod.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub label_sets: Vec<BTreeMap<String, String>>,
    /// The pods, by name.
    #[serde(default)]
    pub pods: Vec<PodInfoEntry>,
}

/// One pod of a PodInfoSlice, as written.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodInfoEntry {
    /// The pod's name (EndpointSlices name it in `targetRef`).
    pub name: String,
    /// Its labels: an index into `labelSets` (absent: 0).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub label_set: u32,
    /// Its creation time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// Since when it has been Ready (its Ready condition's last transition); absent when not Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_since: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// One pod, as agents need it: a [`PodInfoEntry`] with its labels resolved.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodInfo {
    /// The pod's name.
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its creation time.
    pub created: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// Since when it has been Ready; absent when not Ready.
    pub ready_since: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
}

/// A [`PodInfoEntry`] whose `labelSet` names no entry of `labelSets`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("pod {pod} names label set {index}, and the slice has {sets}")]
pub struct UnknownLabelSet {
    /// The pod.
    pub pod: String,
    /// The index it names.
    pub index: u32,
    /// How many label sets the slice has.
    pub sets: usize,
}

impl PodInfoSliceSpec {
    /// The spec holding `pods`, in their order, each distinct label set written once.
    pub fn from_pods(pods: Vec<PodInfo>) -> Self {
        let mut label_sets: Vec<BTreeMap<String, String>> = Vec::new();
        let mut index: BTreeMap<BTreeMap<String, String>, u32> = BTreeMap::new();
        let pods = pods
            .into_iter()
            .map(|pod| {
                let label_set = *index.entry(pod.labels).or_insert_with_key(|labels| {
                    label_sets.push(labels.clone());
                    (label_sets.len() - 1) as u32
                });
                PodInfoEntry { name: pod.name, label_set, created: pod.created, ready_since: pod.ready_since }
            })
            .collect();
        Self { label_sets, pods }
    }

    /// The pods with their labels; an entry naming a label set the slice
    /// lacks (a hand-edited slice) is an error, and the others still come.
    pub fn pods(&self) -> impl Iterator<Item = Result<PodInfo, UnknownLabelSet>> + '_ {
        self.pods.iter().map(|pod| {
            let labels = self.label_sets.get(pod.label_set as usize).ok_or_else(|| UnknownLabelSet {
                pod: pod.name.clone(),
                index: pod.label_set,
                sets: self.label_sets.len(),
            })?;
            Ok(PodInfo {
                name: pod.name.clone(),
                labels: labels.clone(),
                created: pod.created.clone(),
                ready_since: pod.ready_since.clone(),
            })
        })
    }
}

impl WeightedService {
    /// The scheduler to program: `spec.scheduler`, or `wrr` when absent or empty.
    pub fn scheduler(&self) -> &str {
        match self.spec.scheduler.as_deref() {
            None | Some("") => DEFAULT_SCHEDULER,
            Some(s) => s,
        }
    }

    /// The policy name: `spec.policy.name`, or `label-selector`.
    pub fn policy_name(&self) -> &str {
        self.spec
            .policy
            .as_ref()
            .and_then(|p| p.name.as_deref())
            .filter(|n| !n.is_empty())
            .unwrap_or(DEFAULT_POLICY)
    }

    /// The policy config as JSON text (`{}` when absent).
    pub fn policy_config(&self) -> String {
        self.spec
            .policy
            .as_ref()
            .and_then(|p| p.config.as_ref())
            .map_or_else(|| "{}".to_string(), |c| c.to_string())
    }

    /// `spec.policy.version`, if given.
    pub fn policy_version(&self) -> Option<&str> {
        self.spec.policy.as_ref().and_then(|p| p.version.as_deref()).filter(|v| !v.is_empty())
    }

    /// What the policy catalog knows this policy by: `NAME`, or
    /// `NAME.VERSION` (the module file's name without `.wasm`).
    pub fn policy_key(&self) -> String {
        crate::policy::module_key(self.policy_name(), self.policy_version())
    }

    /// The sha256 pin, if any.
    pub fn policy_sha256(&self) -> Option<&str> {
        self.spec.policy.as_ref().and_then(|p| p.sha256.as_deref())
    }

    /// `spec.proxy`, or `kube-proxy` when absent.
    pub fn proxy(&self) -> Proxy {
        self.spec.proxy.unwrap_or_default()
    }
}

/// The CustomResourceDefinitions as deploy/crd.yaml has them: WeightedService,
/// then PodInfoSlice, as YAML documents.
pub fn crds_yaml() -> Result<String, serde_saphyr::SerializeError> {
    use kube::CustomResourceExt;
    Ok(format!("{}---\n{}", serde_saphyr::to_string(&WeightedService::crd())?, serde_saphyr::to_string(&PodInfoSlice::crd())?))
}

fn scheduler_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut names: Vec<&str> = vec![""];
    names.extend_from_slice(SCHEDULERS);
    schemars::json_schema!({
        "type": "string",
        "description": "The IPVS scheduler (default wrr; an empty string also means wrr). Only wrr, wlc, sed, nq, lblc, lblcr, sh and mh take weights into account.",
        "enum": names,
    })
}

fn free_json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "description": "Free JSON handed to the policy. \"allowAllZero\": true lets it give every ready endpoint weight 0.",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, env: &str) -> PodInfo {
        PodInfo { name: name.into(), labels: [("env".to_string(), env.to_string())].into(), ..PodInfo::default() }
    }

    #[test]
    fn a_pod_info_slice_writes_each_label_set_once() {
        let pods = vec![info("a", "prod"), info("b", "canary"), info("c", "prod"), PodInfo { name: "d".into(), ..PodInfo::default() }];
        let spec = PodInfoSliceSpec::from_pods(pods.clone());
        assert_eq!(spec.label_sets.len(), 3, "prod, canary, none");
        let json = serde_json::to_value(&spec).expect("serializes");
        assert_eq!(json["pods"][0], serde_json::json!({"name": "a"}), "set 0 is left out");
        assert_eq!(json["pods"][1]["labelSet"], 1);
        assert_eq!(spec.pods().collect::<Result<Vec<_>, _>>(), Ok(pods), "read back as written");
        let mut bad = spec;
        bad.pods[2].label_set = 9;
        let read: Vec<_> = bad.pods().collect();
        assert_eq!(read[2], Err(UnknownLabelSet { pod: "c".into(), index: 9, sets: 3 }));
        assert!(read[3].is_ok(), "the others still come");
    }

    /// The WeightedService of the original project's README, verbatim.
    const SEED_README: &str = r#"
apiVersion: codesink.net/v1alpha1
kind: WeightedService
metadata:
  name: example
spec:
  selector:
    app: nginx
  ports:
  - protocol: TCP
    port: 80
    targetPort: www
  scheduler: wlc
  weights:
  - weight: 10
    selector:
      env: prod
  - weight: 1
    selector:
      env: canary
"#;

    #[test]
    fn the_original_readme_example_parses() {
        let ws: WeightedService = serde_saphyr::from_str(SEED_README).unwrap();
        assert_eq!(ws.metadata.name.as_deref(), Some("example"));
        assert_eq!(ws.scheduler(), "wlc");
        assert_eq!(ws.policy_name(), DEFAULT_POLICY);
        assert_eq!(ws.spec.weights.len(), 2);
        assert_eq!(ws.spec.weights[0].weight, 10);
        assert_eq!(ws.spec.weights[1].selector.get("env").map(String::as_str), Some("canary"));
        let ports = ws.spec.service.ports.as_ref().unwrap();
        assert_eq!(ports[0].port, 80);
        assert_eq!(
            ports[0].target_port,
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("www".into()))
        );
        let selector = ws.spec.service.selector.as_ref().unwrap();
        assert_eq!(selector.get("app").map(String::as_str), Some("nginx"));
    }

    #[test]
    fn an_empty_scheduler_means_wrr_as_in_the_original() {
        // The Go type serialized `scheduler` without omitempty, so "" reaches us.
        let ws: WeightedService = serde_saphyr::from_str(&SEED_README.replace("scheduler: wlc", "scheduler: \"\"")).unwrap();
        assert_eq!(ws.scheduler(), "wrr");
        let ws: WeightedService = serde_saphyr::from_str(&SEED_README.replace("  scheduler: wlc\n", "")).unwrap();
        assert_eq!(ws.scheduler(), "wrr");
    }

    #[test]
    fn the_service_spec_round_trips_inline() {
        let ws: WeightedService = serde_saphyr::from_str(SEED_README).unwrap();
        let json = serde_json::to_value(&ws).unwrap();
        assert_eq!(json["spec"]["selector"]["app"], "nginx");
        assert_eq!(json["spec"]["ports"][0]["targetPort"], "www");
        assert_eq!(json["spec"]["scheduler"], "wlc");
        let back: WeightedService = serde_json::from_value(json).unwrap();
        assert_eq!(back.spec, ws.spec);
    }

    #[test]
    fn policy_fields() {
        let text = SEED_README.to_string()
            + "  policy:\n    name: gradual-rollout\n    config: {canary: {env: canary}, allowAllZero: true}\n";
        let ws: WeightedService = serde_saphyr::from_str(&text).unwrap();
        assert_eq!(ws.policy_name(), "gradual-rollout");
        let config: serde_json::Value = serde_json::from_str(&ws.policy_config()).unwrap();
        assert_eq!(config["canary"]["env"], "canary");
        assert_eq!(config["allowAllZero"], true);
    }

    #[test]
    fn proxy_is_kube_proxy_unless_the_agents_are_named() {
        let ws: WeightedService = serde_saphyr::from_str(SEED_README).unwrap();
        assert_eq!((ws.proxy(), ws.spec.proxy), (Proxy::KubeProxy, None));
        let ws: WeightedService = serde_saphyr::from_str(&(SEED_README.to_string() + "  proxy: ipvs-operator\n")).unwrap();
        assert_eq!(ws.proxy(), Proxy::IpvsOperator);
        assert_eq!(serde_json::to_value(&ws).unwrap()["spec"]["proxy"], "ipvs-operator");
        let bad: Result<WeightedService, _> = serde_saphyr::from_str(&(SEED_README.to_string() + "  proxy: cilium\n"));
        assert!(bad.is_err(), "an unknown proxy is refused, not taken for kube-proxy");
    }
}
