//! The `status` the controller writes: conditions with reasons a person can act
//! on, the policy in use, and the split per group — computed here, purely, from
//! what the controller observed.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use crate::crd::{
    GroupStatus, HASHING_SCHEDULERS, PolicyStatus, WEIGHT_BLIND_SCHEDULERS, WeightedService,
    WeightedServiceStatus,
};
use crate::policy::{Evaluation, PolicyError, bounded};
use crate::snapshot::Snapshot;
use crate::summary::group_shares;

/// Condition: the owned Service exists as the spec says.
pub const SERVICE_READY: &str = "ServiceReady";
/// Condition: the policy loaded and gave a valid decision.
pub const POLICY_READY: &str = "PolicyReady";
/// Condition: both.
pub const READY: &str = "Ready";
/// Warning condition: the scheduler treats every non-zero weight the same.
pub const SCHEDULER_IGNORES_WEIGHTS: &str = "SchedulerIgnoresWeights";
/// Warning condition: a weight of 0 under a hashing scheduler.
pub const ZERO_WEIGHT_UNDER_HASHING: &str = "ZeroWeightUnderHashing";
/// The reason of `PolicyReady` (and `Ready`) while the Service or the pods
/// behind the endpoints are not known yet.
pub const PENDING: &str = "Pending";

/// How creating the owned Service went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceOutcome {
    /// Applied; the name and the ClusterIP the API server assigned.
    Applied {
        /// The Service's name.
        name: String,
        /// Its ClusterIP (`None` for headless or not yet assigned).
        cluster_ip: Option<String>,
    },
    /// A Service of that name exists and belongs to something else: left alone.
    Conflict {
        /// The Service's name.
        name: String,
    },
    /// The API server refused the apply.
    Failed {
        /// The Service's name.
        name: String,
        /// The API server's message.
        message: String,
    },
}

/// How evaluating the policy went.
pub enum PolicyOutcome<'a> {
    /// A valid decision.
    Evaluated {
        /// The policy's name and hash.
        policy: PolicyStatus,
        /// The snapshot it saw.
        snapshot: &'a Snapshot,
        /// What it decided.
        evaluation: &'a Evaluation,
    },
    /// The policy could not be used; the last good split stays.
    Failed(&'a PolicyError),
    /// Not evaluated (no Service yet, or endpoints not all known yet).
    Pending(String),
}

/// The status for `ws` given what happened, keeping `lastTransitionTime` of
/// conditions whose status did not change and the last good split when the
/// policy failed.
pub fn compute(ws: &WeightedService, service: &ServiceOutcome, policy: &PolicyOutcome<'_>, now: Timestamp) -> WeightedServiceStatus {
    let previous = ws.status.clone().unwrap_or_default();
    let generation = ws.metadata.generation;
    let mut conditions = Vec::new();
    let mut condition = |type_: &str, ok: bool, reason: &str, message: String| {
        let status = if ok { "True" } else { "False" };
        let since = previous
            .conditions
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .map_or_else(|| Time(now), |c| c.last_transition_time.clone());
        conditions.push(Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: bounded(message),
            last_transition_time: since,
            observed_generation: generation,
        });
    };

    let (service_ok, service_reason, service_name) = match service {
        ServiceOutcome::Applied { name, cluster_ip } => {
            let message = match cluster_ip {
                Some(ip) => format!("Service {name} has ClusterIP {ip}"),
                None => format!("Service {name} is applied"),
            };
            condition(SERVICE_READY, true, "Applied", message);
            (true, "Applied", Some(name.clone()))
        }
        ServiceOutcome::Conflict { name } => {
            condition(
                SERVICE_READY,
                false,
                "ServiceConflict",
                format!("a Service named {name} exists and is not owned by this WeightedService; delete or rename it"),
            );
            (false, "ServiceConflict", None)
        }
        ServiceOutcome::Failed { name, message } => {
            condition(SERVICE_READY, false, "ApplyFailed", format!("applying Service {name}: {message}"));
            (false, "ApplyFailed", Some(name.clone()))
        }
    };

    let mut groups = previous.groups.clone();
    let mut policy_status = previous.policy.clone();
    let mut message = previous.message.clone();
    let (policy_ok, policy_reason) = match policy {
        PolicyOutcome::Evaluated { policy, snapshot, evaluation } => {
            groups = group_shares(snapshot, &evaluation.weights)
                .into_iter()
                .map(|g| GroupStatus {
                    selector: g.selector,
                    weight: g.weight,
                    endpoints: g.endpoints,
                    share: (g.share * 10_000.0).round() / 10_000.0,
                })
                .collect();
            let ready = snapshot.endpoints.iter().filter(|e| e.ready).count();
            condition(
                POLICY_READY,
                true,
                "Evaluated",
                format!("policy {} gave weights to {ready} ready endpoints", policy.name),
            );
            policy_status = Some(policy.clone());
            message = evaluation.message.clone();
            let scheduler = ws.scheduler();
            let has_zero = snapshot.endpoints.iter().zip(&evaluation.weights).any(|(e, w)| e.ready && *w == 0);
            if HASHING_SCHEDULERS.contains(&scheduler) && has_zero {
                condition(
                    ZERO_WEIGHT_UNDER_HASHING,
                    true,
                    "ZeroWeight",
                    format!(
                        "scheduler {scheduler} keeps hash slots for weight-0 destinations, so connections hashing to them fail; use wrr or wlc, or non-zero weights"
                    ),
                );
            }
            (true, "Evaluated")
        }
        PolicyOutcome::Failed(error) => {
            let reason = crate::agent::reason_for(error);
            condition(POLICY_READY, false, reason, format!("{error}; the last good weights stay"));
            message = Some(error.to_string());
            (false, reason)
        }
        PolicyOutcome::Pending(why) => {
            condition(POLICY_READY, false, PENDING, why.clone());
            (false, PENDING)
        }
    };
    let scheduler = ws.scheduler();
    if WEIGHT_BLIND_SCHEDULERS.contains(&scheduler) {
        condition(
            SCHEDULER_IGNORES_WEIGHTS,
            true,
            "WeightBlindScheduler",
            format!("scheduler {scheduler} only tells zero from non-zero weights: every other destination gets the same share; use wrr or wlc"),
        );
    }
    let (ready_reason, ready_message) = match (service_ok, policy_ok) {
        (true, true) => ("Ready", "the Service exists and the policy gave valid weights".to_string()),
        (false, _) => (service_reason, "the Service is not ready".to_string()),
        (true, false) => (policy_reason, "the policy has not given valid weights".to_string()),
    };
    condition(READY, service_ok && policy_ok, ready_reason, ready_message);

    WeightedServiceStatus {
        observed_generation: generation,
        service_name: service_name.or(previous.service_name),
        policy: policy_status,
        conditions,
        groups,
        message: message.map(bounded),
    }
}

/// Whether two statuses say the same (conditions compared without their times).
pub fn same(a: &WeightedServiceStatus, b: &WeightedServiceStatus) -> bool {
    let strip = |s: &WeightedServiceStatus| {
        let mut s = s.clone();
        for c in &mut s.conditions {
            c.last_transition_time = Time(Timestamp::UNIX_EPOCH);
        }
        s
    };
    strip(a) == strip(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::WeightedServiceSpec;
    use crate::snapshot::{Endpoint, ServiceMeta};
    use std::sync::Arc;
    use std::time::Duration;

    fn ws(scheduler: &str) -> WeightedService {
        let mut ws = WeightedService::new(
            "web",
            WeightedServiceSpec {
                scheduler: Some(scheduler.into()),
                weights: vec![crate::crd::WeightGroup { weight: 10, selector: [("env".into(), "prod".into())].into() }],
                ..Default::default()
            },
        );
        ws.metadata.generation = Some(3);
        ws
    }

    fn snapshot() -> Snapshot {
        let endpoint = |env: &str| Endpoint {
            pod_name: None,
            address: "10.0.0.1".parse().unwrap(),
            node_name: None,
            zone: None,
            labels: Arc::new([("env".to_string(), env.to_string())].into()),
            ready: true,
            serving: true,
            terminating: false,
            created: None,
            ready_since: None,
            ports: vec![],
            hints: Default::default(),
        };
        Snapshot {
            service: ServiceMeta::default(),
            groups: ws("wrr").spec.weights,
            config: "{}".into(),
            endpoints: vec![endpoint("prod"), endpoint("canary")],
            node: None,
            now: Timestamp::UNIX_EPOCH,
        }
    }

    fn applied() -> ServiceOutcome {
        ServiceOutcome::Applied { name: "web".into(), cluster_ip: Some("10.96.0.10".into()) }
    }

    fn policy() -> PolicyStatus {
        PolicyStatus { name: "label-selector".into(), version: None, sha256: "ab".repeat(32) }
    }

    fn condition<'a>(status: &'a WeightedServiceStatus, type_: &str) -> Option<&'a Condition> {
        status.conditions.iter().find(|c| c.type_ == type_)
    }

    #[test]
    fn a_good_evaluation_is_ready_with_the_split() {
        let snap = snapshot();
        let evaluation = Evaluation { weights: vec![10, 1], requeue_after: None, message: None };
        let status = compute(&ws("wrr"), &applied(), &PolicyOutcome::Evaluated { policy: policy(), snapshot: &snap, evaluation: &evaluation }, Timestamp::UNIX_EPOCH);
        assert_eq!(status.observed_generation, Some(3));
        assert_eq!(status.service_name.as_deref(), Some("web"));
        assert_eq!(condition(&status, READY).unwrap().status, "True");
        assert_eq!(status.groups.len(), 2);
        assert_eq!(status.groups[0].endpoints, 1);
        assert!((status.groups[0].share - 0.9091).abs() < 1e-9, "{:?}", status.groups);
        assert!(condition(&status, SCHEDULER_IGNORES_WEIGHTS).is_none());
    }

    #[test]
    fn a_failed_policy_keeps_the_last_split_and_says_why() {
        let snap = snapshot();
        let evaluation = Evaluation { weights: vec![10, 1], requeue_after: Some(Duration::from_secs(5)), message: None };
        let mut w = ws("wrr");
        w.status = Some(compute(&w, &applied(), &PolicyOutcome::Evaluated { policy: policy(), snapshot: &snap, evaluation: &evaluation }, Timestamp::UNIX_EPOCH));
        let error = PolicyError::Timeout { policy: "slow".into(), limit: Duration::from_millis(50) };
        let later = Timestamp::from_second(100).unwrap();
        let status = compute(&w, &applied(), &PolicyOutcome::Failed(&error), later);
        let policy_ready = condition(&status, POLICY_READY).unwrap();
        assert_eq!((policy_ready.status.as_str(), policy_ready.reason.as_str()), ("False", "PolicyFailed"));
        assert!(policy_ready.message.contains("last good weights stay"));
        assert_eq!(policy_ready.last_transition_time.0, later);
        assert_eq!(status.groups, w.status.as_ref().unwrap().groups, "the last good split stays");
        let ready = condition(&status, READY).unwrap();
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "PolicyFailed"));
        // ServiceReady did not change: its transition time stays.
        assert_eq!(condition(&status, SERVICE_READY).unwrap().last_transition_time.0, Timestamp::UNIX_EPOCH);
    }

    #[test]
    fn weight_blind_and_hashing_schedulers_warn() {
        let snap = snapshot();
        let evaluation = Evaluation { weights: vec![10, 0], requeue_after: None, message: None };
        let outcome = PolicyOutcome::Evaluated { policy: policy(), snapshot: &snap, evaluation: &evaluation };
        let rr = compute(&ws("rr"), &applied(), &outcome, Timestamp::UNIX_EPOCH);
        assert_eq!(condition(&rr, SCHEDULER_IGNORES_WEIGHTS).unwrap().status, "True");
        let sh = compute(&ws("sh"), &applied(), &outcome, Timestamp::UNIX_EPOCH);
        assert_eq!(condition(&sh, ZERO_WEIGHT_UNDER_HASHING).unwrap().status, "True");
        let wrr = compute(&ws("wrr"), &applied(), &outcome, Timestamp::UNIX_EPOCH);
        assert!(condition(&wrr, ZERO_WEIGHT_UNDER_HASHING).is_none());
    }

    #[test]
    fn a_service_conflict_is_not_ready() {
        let status = compute(&ws("wrr"), &ServiceOutcome::Conflict { name: "web".into() }, &PolicyOutcome::Pending("no Service".into()), Timestamp::UNIX_EPOCH);
        let ready = condition(&status, READY).unwrap();
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "ServiceConflict"));
        assert!(condition(&status, SERVICE_READY).unwrap().message.contains("not owned"));
    }

    #[test]
    fn same_ignores_transition_times() {
        let a = compute(&ws("wrr"), &applied(), &PolicyOutcome::Pending("x".into()), Timestamp::UNIX_EPOCH);
        let b = compute(&ws("wrr"), &applied(), &PolicyOutcome::Pending("x".into()), Timestamp::from_second(5).unwrap());
        assert!(same(&a, &b));
        let c = compute(&ws("wrr"), &applied(), &PolicyOutcome::Pending("y".into()), Timestamp::UNIX_EPOCH);
        assert!(!same(&a, &c));
    }
}
