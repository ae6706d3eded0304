//! deploy/crd.yaml is generated from the Rust types; nobody edits it.

use std::path::Path;

use ipvs_operator::crd::WeightedService;
use kube::CustomResourceExt;

#[test]
fn deploy_crd_yaml_is_what_the_types_generate() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crd.yaml");
    let generated = ipvs_operator::crd::crds_yaml().unwrap();
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == generated,
        "deploy/crd.yaml differs from the CRD the Rust types generate: run `make crd` \
         (ipvs-operator crd > deploy/crd.yaml) and commit the result"
    );
}

#[test]
fn the_crd_is_the_original_group_kind_and_version() {
    let crd = WeightedService::crd();
    assert_eq!(crd.metadata.name.as_deref(), Some("weightedservices.codesink.net"));
    assert_eq!(crd.spec.group, "codesink.net");
    assert_eq!(crd.spec.names.kind, "WeightedService");
    assert_eq!(crd.spec.scope, "Namespaced");
    let version = &crd.spec.versions[0];
    assert_eq!(version.name, "v1alpha1");
    assert!(version.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some());
    let columns: Vec<&str> = version.additional_printer_columns.iter().flatten().map(|c| c.name.as_str()).collect();
    assert_eq!(columns, ["Service", "Policy", "Ready", "Age"]);
    let schema = serde_json::to_value(version.schema.as_ref().unwrap()).unwrap();
    let weight = &schema["openAPIV3Schema"]["properties"]["spec"]["properties"]["weights"]["items"]["properties"]["weight"];
    assert_eq!(weight["maximum"], 65535.0);
    let scheduler = &schema["openAPIV3Schema"]["properties"]["spec"]["properties"]["scheduler"]["enum"];
    assert!(scheduler.as_array().unwrap().iter().any(|s| s == "wlc"));
}

#[test]
fn pod_info_slices_are_ours_and_namespaced() {
    let crd = ipvs_operator::crd::PodInfoSlice::crd();
    assert_eq!(crd.metadata.name.as_deref(), Some("podinfoslices.codesink.net"));
    assert_eq!(crd.spec.scope, "Namespaced");
    let version = &crd.spec.versions[0];
    assert!(version.subresources.as_ref().and_then(|s| s.status.as_ref()).is_none(), "no status: the controller writes all of it");
    let schema = serde_json::to_value(version.schema.as_ref().unwrap()).unwrap();
    let pod = &schema["openAPIV3Schema"]["properties"]["spec"]["properties"]["pods"]["items"]["properties"];
    for field in ["name", "labelSet", "created", "readySince"] {
        assert!(pod.get(field).is_some(), "{field} in {pod}");
    }
    let label_sets = &schema["openAPIV3Schema"]["properties"]["spec"]["properties"]["labelSets"];
    assert_eq!(label_sets["items"]["additionalProperties"]["type"], "string", "{label_sets}");
}

#[test]
fn the_original_projects_example_parses_as_it_did() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/original-example.yaml");
    let objects = ipvs_operator::eval::read_objects(&path).unwrap();
    assert_eq!(objects.weighted_services.len(), 1);
    let ws = &objects.weighted_services[0];
    assert_eq!(ws.scheduler(), "wrr", "no scheduler in the original example: wrr");
    assert_eq!(ws.policy_name(), "label-selector");
    assert_eq!(ws.spec.weights.iter().map(|w| w.weight).collect::<Vec<_>>(), [10, 1]);
    assert_eq!(objects.ignored_kinds, ["Deployment", "Deployment", "Ingress"]);
}
