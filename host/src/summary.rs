//! How a decision splits new connections between the groups of `spec.weights`.
//!
//! Under a weighted scheduler each ready destination receives new connections in
//! proportion to its weight, so a group's expected share is the sum of its ready
//! endpoints' weights over the sum for all ready endpoints.

use crate::crd::WeightGroup;
use crate::snapshot::{Labels, Snapshot};

/// One group's part of the split.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupShare {
    /// Index into `spec.weights`; `None` for endpoints no group matches.
    pub group: Option<usize>,
    /// The group's selector (empty for no group).
    pub selector: Labels,
    /// The group's weight in the spec.
    pub weight: Option<u32>,
    /// Ready endpoints in the group.
    pub endpoints: u32,
    /// Sum of the weights decided for them.
    pub total_weight: u64,
    /// Expected share of new connections, 0..=1.
    pub share: f64,
}

/// The group an endpoint with `labels` belongs to: the last one whose selector matches.
pub fn group_of(groups: &[WeightGroup], labels: &Labels) -> Option<usize> {
    groups
        .iter()
        .rposition(|g| g.selector.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// The split `weights` (one per endpoint of `snapshot`) gives, per group in spec
/// order, then the endpoints of no group if there are any.
pub fn group_shares(snapshot: &Snapshot, weights: &[u16]) -> Vec<GroupShare> {
    let mut rows: Vec<GroupShare> = snapshot
        .groups
        .iter()
        .enumerate()
        .map(|(i, g)| GroupShare {
            group: Some(i),
            selector: g.selector.clone(),
            weight: Some(g.weight),
            endpoints: 0,
            total_weight: 0,
            share: 0.0,
        })
        .collect();
    let mut ungrouped = GroupShare {
        group: None,
        selector: Labels::new(),
        weight: None,
        endpoints: 0,
        total_weight: 0,
        share: 0.0,
    };
    for (endpoint, weight) in snapshot.endpoints.iter().zip(weights) {
        if !endpoint.ready {
            continue;
        }
        let row = match group_of(&snapshot.groups, &endpoint.labels) {
            Some(i) => &mut rows[i],
            None => &mut ungrouped,
        };
        row.endpoints += 1;
        row.total_weight += u64::from(*weight);
    }
    if ungrouped.endpoints > 0 {
        rows.push(ungrouped);
    }
    let total: u64 = rows.iter().map(|r| r.total_weight).sum();
    for row in &mut rows {
        row.share = if total == 0 { 0.0 } else { row.total_weight as f64 / total as f64 };
    }
    rows
}

/// `env=prod,tier=web`, or `(no group)` for an empty selector of the ungrouped row.
pub fn selector_text(share: &GroupShare) -> String {
    if share.group.is_none() {
        return "(no group)".into();
    }
    if share.selector.is_empty() {
        return "(everything)".into();
    }
    share
        .selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{Endpoint, ServiceMeta};
    use k8s_openapi::jiff::Timestamp;

    fn endpoint(env: &str, ready: bool) -> Endpoint {
        Endpoint {
            pod_name: None,
            address: "10.0.0.1".parse().unwrap(),
            node_name: None,
            zone: None,
            labels: std::sync::Arc::new([("env".to_string(), env.to_string())].into()),
            ready,
            serving: ready,
            terminating: false,
            created: None,
            ready_since: None,
            ports: vec![],
            hints: Default::default(),
        }
    }

    fn group(weight: u32, env: &str) -> WeightGroup {
        WeightGroup {
            weight,
            selector: [("env".to_string(), env.to_string())].into(),
        }
    }

    #[test]
    fn the_seed_split_is_30_to_3() {
        let snapshot = Snapshot {
            service: ServiceMeta::default(),
            groups: vec![group(10, "prod"), group(1, "canary")],
            config: "{}".into(),
            endpoints: (0..3)
                .map(|_| endpoint("prod", true))
                .chain((0..3).map(|_| endpoint("canary", true)))
                .chain([endpoint("canary", false), endpoint("staging", true)])
                .collect(),
            node: None,
            now: Timestamp::UNIX_EPOCH,
        };
        let rows = group_shares(&snapshot, &[10, 10, 10, 1, 1, 1, 1, 0]);
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].endpoints, 3);
        assert!((rows[0].share - 30.0 / 33.0).abs() < 1e-9);
        assert_eq!(rows[1].endpoints, 3, "the unready canary does not count");
        assert!((rows[1].share - 3.0 / 33.0).abs() < 1e-9);
        assert_eq!(rows[2].group, None);
        assert_eq!(rows[2].share, 0.0);
        assert_eq!(selector_text(&rows[2]), "(no group)");
        assert_eq!(selector_text(&rows[0]), "env=prod");
    }
}
