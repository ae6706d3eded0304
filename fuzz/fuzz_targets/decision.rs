//! The host's check of a policy's decision (`ipvs_operator::policy::check_decision`,
//! what `LoadedPolicy::evaluate` applies to every decision: one weight per
//! endpoint, 0..=65535, all-zero refused unless the config allows it), then
//! what the controller, the agent and `eval` do with an accepted one.
#![no_main]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use ipvs_operator::agent::plan::ServicePlan;
use ipvs_operator::crd::WeightGroup;
use ipvs_operator::eval;
use ipvs_operator::policy::{PolicyError, check_decision};
use ipvs_operator::snapshot::{Endpoint, EndpointPort, Protocol, ServiceMeta, Snapshot};
use ipvs_operator::status::{self, PolicyOutcome, ServiceOutcome};
use ipvs_operator::summary::group_shares;
use ipvs_policy_sdk::MAX_WEIGHT;
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::jiff::Timestamp;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    /// Per endpoint: ready, terminating, which label value it has.
    endpoints: Vec<(bool, bool, u8)>,
    /// What the policy returned.
    weights: Vec<u32>,
    requeue_after_ms: Option<u64>,
    message: Option<String>,
    /// The policy config text (JSON or not).
    config: Config,
    /// Groups of `spec.weights`: weight and label value.
    groups: Vec<(u32, u8)>,
    scheduler: u8,
}

#[derive(Arbitrary, Debug)]
enum Config {
    AllowAllZero(bool),
    Text(String),
}

const SCHEDULERS: &[&str] = &["wrr", "rr", "sh", "mh", "wlc"];

fuzz_target!(|input: Input| {
    let config = match &input.config {
        Config::AllowAllZero(allow) => format!("{{\"allowAllZero\": {allow}}}"),
        Config::Text(text) => text.clone(),
    };
    let label = |v: u8| BTreeMap::from([("env".to_string(), format!("v{}", v % 4))]);
    let snapshot = Snapshot {
        service: ServiceMeta {
            namespace: "default".into(),
            name: "fuzz".into(),
            selector: BTreeMap::new(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
        },
        groups: input.groups.iter().map(|&(weight, v)| WeightGroup { weight, selector: label(v) }).collect(),
        config,
        endpoints: input
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, &(ready, terminating, v))| Endpoint {
                pod_name: (i % 2 == 0).then(|| format!("pod-{i}")),
                address: IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i as u32)),
                node_name: None,
                zone: None,
                labels: Arc::new(label(v)),
                ready: ready && !terminating,
                serving: ready,
                terminating,
                created: None,
                ready_since: None,
                ports: vec![EndpointPort { service_port: 80, target_port: 8080, protocol: Protocol::Tcp }],
            })
            .collect(),
        node: None,
        now: Timestamp::UNIX_EPOCH,
    };

    let result = check_decision("fuzz", &snapshot, &input.weights, input.requeue_after_ms, input.message.clone());
    let allow_all_zero = ipvs_policy_sdk::config::allow_all_zero(&snapshot.config);
    let evaluation = match result {
        Err(PolicyError::InvalidDecision { reason, .. }) => {
            assert!(!reason.is_empty());
            return;
        }
        Err(other) => panic!("the check refused with {other:?}"),
        Ok(evaluation) => evaluation,
    };
    // What was accepted obeys the rules.
    assert_eq!(evaluation.weights.len(), snapshot.endpoints.len(), "one weight per endpoint");
    for (sent, kept) in input.weights.iter().zip(&evaluation.weights) {
        assert!(*sent <= MAX_WEIGHT);
        assert_eq!(*sent, u32::from(*kept), "a weight changed");
    }
    let ready: Vec<u16> = snapshot.endpoints.iter().zip(&evaluation.weights).filter(|(e, _)| e.ready).map(|(_, w)| *w).collect();
    if !ready.is_empty() && !allow_all_zero {
        assert!(ready.iter().any(|w| *w > 0), "every ready endpoint at 0 was accepted");
    }

    // The agent: when to evaluate again (agent/mod.rs: `instant + d`).
    if let Some(after) = evaluation.requeue_after {
        let _due = Instant::now() + after;
        // The controller requeues after at most its resync period.
        let _ = after.min(Duration::from_secs(300));
    }
    // The agent: the weights for the Service's virtual services.
    let service = Service {
        spec: Some(ServiceSpec {
            cluster_ip: Some("10.96.0.1".into()),
            ports: Some(vec![ServicePort { port: 80, protocol: Some("TCP".into()), ..Default::default() }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    let scheduler = SCHEDULERS[usize::from(input.scheduler) % SCHEDULERS.len()];
    let plan = ServicePlan::new(&service, &snapshot, scheduler, |i, _| evaluation.weights.get(i).copied());
    let planned = snapshot.endpoints.iter().filter(|e| e.ready).count();
    assert_eq!(plan.ports[0].weights.len(), planned);

    // The controller: status with the split per group.
    let shares = group_shares(&snapshot, &evaluation.weights);
    for share in &shares {
        assert!((0.0..=1.0).contains(&share.share), "{share:?}");
    }
    let ws = ipvs_operator::crd::WeightedService::new(
        "fuzz",
        ipvs_operator::crd::WeightedServiceSpec { scheduler: Some(scheduler.into()), ..Default::default() },
    );
    let policy = ipvs_operator::crd::PolicyStatus { name: "fuzz".into(), version: None, sha256: "0".repeat(64) };
    let outcome = PolicyOutcome::Evaluated { policy, snapshot: &snapshot, evaluation: &evaluation };
    let applied = ServiceOutcome::Applied { name: "fuzz".into(), cluster_ip: Some("10.96.0.1".into()) };
    let status = status::compute(&ws, &applied, &outcome, Timestamp::UNIX_EPOCH);
    serde_json::to_string(&status).expect("a status serializes");

    // `eval`: the report and its table.
    let report = eval::report("fuzz", "abc", &snapshot, &evaluation);
    let _ = eval::render_table(&report, &snapshot, Timestamp::UNIX_EPOCH);
    serde_json::to_string(&report).expect("a report serializes");
});
