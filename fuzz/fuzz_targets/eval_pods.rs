//! `ipvs-operator eval`'s reader: a YAML file of WeightedServices, Pods and
//! Nodes (`---` documents, `kind: List`, `PodList`, `NodeList`), then what
//! `eval` builds from it: the WeightedService chosen, the node, the snapshot
//! with zones, the report and its table (with the label-selector split in
//! place of the wasm policy).
#![no_main]

use std::path::Path;

use ipvs_operator::crd::WeightedService;
use ipvs_operator::eval;
use ipvs_operator::policy::Evaluation;
use ipvs_operator::snapshot::Snapshot;
use ipvs_operator::summary::group_of;
use k8s_openapi::jiff::Timestamp;
use libfuzzer_sys::fuzz_target;

/// The WeightedService when the file has none (`eval --pods` of another file).
const DEFAULT_WS: &str = include_str!("../../examples/seed-canary.yaml");

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let path = Path::new("fuzz.yaml");
    let Ok(objects) = eval::parse_objects(text, path) else { return };
    let names: Vec<Option<String>> = objects.weighted_services.iter().map(|w| w.metadata.name.clone()).collect();
    let ws = match eval::choose_weighted_service(path, objects.weighted_services.clone(), None) {
        Ok(ws) => ws,
        Err(_) => match names.first() {
            Some(Some(name)) => eval::choose_weighted_service(path, objects.weighted_services.clone(), Some(name))
                .expect("the WeightedService named exists"),
            _ => serde_saphyr::from_str::<WeightedService>(DEFAULT_WS).unwrap(),
        },
    };
    let node_name = objects.nodes.first().and_then(|n| n.metadata.name.clone()).unwrap_or_else(|| "node-1".into());
    let node = eval::node_info(&node_name, &objects.nodes);
    let now = Timestamp::UNIX_EPOCH;
    let (mut snapshot, _skipped) = Snapshot::from_pods(&ws, &objects.pods, Some(node), now);
    eval::add_zones(&mut snapshot, &objects.nodes);
    let _ = snapshot.input_hash();

    // The label-selector policy's split: the last matching group's weight, else 1.
    let weights = snapshot
        .endpoints
        .iter()
        .map(|e| group_of(&snapshot.groups, &e.labels).map_or(1, |g| snapshot.groups[g].weight.min(65535) as u16))
        .collect();
    let evaluation = Evaluation { weights, requeue_after: None, message: None };
    let report = eval::report(ws.policy_name(), "0123456789abcdef", &snapshot, &evaluation);
    let _ = eval::render_table(&report, &snapshot, now);
    serde_json::to_string_pretty(&report).expect("a report serializes");
});
