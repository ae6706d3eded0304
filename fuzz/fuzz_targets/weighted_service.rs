//! A WeightedService as the controller and the agent receive it (JSON from the
//! API server) and as `eval` reads it (YAML), then everything they derive from
//! the spec alone: scheduler, policy name, config and pin, the snapshot, the
//! status, the agent's plan for the owned Service.
#![no_main]

use ipvs_operator::agent::plan::ServicePlan;
use ipvs_operator::crd::WeightedService;
use ipvs_operator::snapshot::Snapshot;
use ipvs_operator::status::{self, PolicyOutcome, ServiceOutcome};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::jiff::Timestamp;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(ws) = serde_json::from_slice::<WeightedService>(data) {
        check(&ws);
    }
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(ws) = serde_saphyr::from_str::<WeightedService>(text)
    {
        check(&ws);
    }
});

fn check(ws: &WeightedService) {
    // What the API server stores is what the operator reads back.
    let json = serde_json::to_value(ws).expect("a WeightedService serializes");
    let back: WeightedService = serde_json::from_value(json.clone()).expect("a serialized WeightedService parses");
    assert_eq!(serde_json::to_value(&back).unwrap(), json, "JSON round trip changed the object");

    let scheduler = ws.scheduler();
    assert!(!scheduler.is_empty());
    assert!(!ws.policy_name().is_empty());
    let _ = ws.policy_sha256();
    // The policy gets its config as JSON text: it must be JSON.
    let config = ws.policy_config();
    serde_json::from_str::<serde_json::Value>(&config).expect("the policy config handed to a policy is JSON");
    let _ = ipvs_policy_sdk::config::allow_all_zero(&config);
    let _ = ipvs_policy_sdk::config::parse::<serde_json::Value>(&config);

    let now = Timestamp::UNIX_EPOCH;
    let (snapshot, _) = Snapshot::from_pods(ws, &[], None, now);
    let _ = snapshot.input_hash();
    let applied = ServiceOutcome::Applied { name: snapshot.service.name.clone(), cluster_ip: None };
    let status = status::compute(ws, &applied, &PolicyOutcome::Pending("fuzz".into()), now);
    assert!(status::same(&status, &status));
    serde_json::to_string(&status).expect("a status serializes");

    let service = Service { spec: Some(ws.spec.service.clone()), ..Default::default() };
    let plan = ServicePlan::new(&service, &snapshot, scheduler, |_, _| Some(1));
    assert_eq!(plan.scheduler, scheduler);
}
