//! The [`PodInfoSlice`]s the controller publishes for each WeightedService:
//! which pods go in which slice, and which slices to write or delete.
//!
//! As the EndpointSlice controller does, a pod stays in the slice it is in; new
//! pods fill slices with room before a new slice is made; a slice is written
//! only when its content changes and deleted when it has no pod left. A pod
//! that becomes Ready then rewrites one slice of at most [`PODS_PER_SLICE`].

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use kube::{Resource, ResourceExt};

use crate::cluster::OWNER_LABEL;
use crate::crd::{PodInfo, PodInfoSlice, PodInfoSliceSpec, WeightedService, PODS_PER_SLICE};
use crate::snapshot::PodMeta;

/// A WeightedService's slices: name and pods.
pub type Slices = Vec<(String, Vec<PodInfo>)>;

/// What to write and delete so that a WeightedService's slices hold `desired`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SlicePlan {
    /// Slices to create or replace: name and pods (sorted by name).
    pub writes: Vec<(String, Vec<PodInfo>)>,
    /// Slices to delete.
    pub deletes: Vec<String>,
}

impl SlicePlan {
    /// Whether nothing needs writing.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.deletes.is_empty()
    }
}

/// A pod as published: its name and what agents need of it.
pub fn pod_info(name: &str, meta: &PodMeta) -> PodInfo {
    PodInfo {
        name: name.to_string(),
        labels: meta.labels.as_ref().clone(),
        created: meta.created.map(Time),
        ready_since: meta.ready_since.map(Time),
    }
}

/// The writes and deletes that turn `existing` (the WeightedService `ws`'s
/// slices: name, pods) into slices holding exactly `desired`.
pub fn plan_slices(ws: &str, existing: &[(String, Vec<PodInfo>)], desired: Vec<PodInfo>) -> SlicePlan {
    let mut desired: BTreeMap<String, PodInfo> = desired.into_iter().map(|p| (p.name.clone(), p)).collect();
    let mut existing: Vec<&(String, Vec<PodInfo>)> = existing.iter().collect();
    existing.sort_by(|a, b| a.0.cmp(&b.0));
    // Pods stay where they are (once, at most a slice's worth each).
    let mut slices: Vec<(String, Vec<PodInfo>)> = existing
        .iter()
        .map(|(name, pods)| {
            let mut kept = Vec::new();
            for pod in pods {
                if kept.len() < PODS_PER_SLICE
                    && let Some(now) = desired.remove(&pod.name)
                {
                    kept.push(now);
                }
            }
            (name.clone(), kept)
        })
        .collect();
    // New pods fill the slices with room, then new slices.
    let mut new = desired.into_values().peekable();
    for (_, pods) in &mut slices {
        while pods.len() < PODS_PER_SLICE
            && let Some(pod) = new.next()
        {
            pods.push(pod);
        }
    }
    let taken: BTreeSet<String> = slices.iter().map(|(n, _)| n.clone()).collect();
    let mut names = (0..).map(|n| format!("{ws}-{n}")).filter(|n| !taken.contains(n));
    while new.peek().is_some() {
        let pods: Vec<PodInfo> = new.by_ref().take(PODS_PER_SLICE).collect();
        slices.push((names.next().unwrap_or_default(), pods));
    }
    let mut plan = SlicePlan::default();
    for (name, mut pods) in slices {
        pods.sort_by(|a, b| a.name.cmp(&b.name));
        let before = existing.iter().find(|(n, _)| *n == name).map(|(_, pods)| pods);
        if pods.is_empty() {
            if before.is_some() {
                plan.deletes.push(name);
            }
            continue;
        }
        let unchanged = before.is_some_and(|before| {
            let mut before: Vec<&PodInfo> = before.iter().collect();
            before.sort_by(|a, b| a.name.cmp(&b.name));
            before.len() == pods.len() && before.iter().zip(&pods).all(|(a, b)| *a == b)
        });
        if !unchanged {
            plan.writes.push((name, pods));
        }
    }
    plan
}

/// The slice `name` of `ws`, holding `pods`: labelled with the
/// WeightedService's name and owned by it (deleting it collects its slices).
pub fn slice_object(ws: &WeightedService, name: &str, pods: Vec<PodInfo>) -> PodInfoSlice {
    let owner = OwnerReference {
        api_version: WeightedService::api_version(&()).into_owned(),
        kind: WeightedService::kind(&()).into_owned(),
        name: ws.name_any(),
        uid: ws.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        // As on the Service: blocking the owner's deletion would need
        // `update` on weightedservices/finalizers where admission enforces it.
        block_owner_deletion: None,
    };
    PodInfoSlice {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: ws.namespace(),
            labels: Some([(OWNER_LABEL.to_string(), ws.name_any())].into()),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        spec: PodInfoSliceSpec::from_pods(pods),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, env: &str) -> PodInfo {
        PodInfo { name: name.into(), labels: [("env".to_string(), env.to_string())].into(), ..PodInfo::default() }
    }

    fn pods(prefix: &str, n: usize) -> Vec<PodInfo> {
        (0..n).map(|i| pod(&format!("{prefix}-{i:04}"), "prod")).collect()
    }

    fn names(pods: &[PodInfo]) -> Vec<&str> {
        pods.iter().map(|p| p.name.as_str()).collect()
    }

    #[test]
    fn pods_are_split_at_a_hundred_per_slice() {
        let plan = plan_slices("web", &[], pods("p", 250));
        let sizes: Vec<(&str, usize)> = plan.writes.iter().map(|(n, p)| (n.as_str(), p.len())).collect();
        assert_eq!(sizes, [("web-0", 100), ("web-1", 100), ("web-2", 50)]);
        assert!(plan.deletes.is_empty());
        assert!(plan_slices("web", &[], Vec::new()).is_empty(), "no pods, no slice");
    }

    #[test]
    fn only_the_slice_whose_content_changed_is_written() {
        let all = pods("p", 150);
        let first = plan_slices("web", &[], all.clone());
        assert!(plan_slices("web", &first.writes, all.clone()).is_empty(), "nothing changed: nothing written");
        // One pod changes its labels: its slice only.
        let mut relabelled = all.clone();
        relabelled[120] = pod("p-0120", "canary");
        let plan = plan_slices("web", &first.writes, relabelled);
        assert_eq!(plan.writes.len(), 1);
        assert_eq!(plan.writes[0].0, "web-1");
        assert!(plan.writes[0].1.contains(&pod("p-0120", "canary")));
    }

    #[test]
    fn pods_stay_in_their_slices_and_new_ones_fill_the_room_left() {
        let first = plan_slices("web", &[], pods("p", 150)).writes;
        // p-0000 goes, a pod named before all others comes: it takes the room
        // in web-0, and web-1 (p-0100..) is not rewritten.
        let mut now = pods("p", 150);
        now.remove(0);
        now.push(pod("a-new", "prod"));
        let plan = plan_slices("web", &first, now);
        assert_eq!(plan.writes.len(), 1);
        assert_eq!(plan.writes[0].0, "web-0");
        assert_eq!(names(&plan.writes[0].1)[0], "a-new");
        assert_eq!(plan.writes[0].1.len(), 100);
    }

    #[test]
    fn a_slice_left_empty_is_deleted_and_its_name_reused_later() {
        let first = plan_slices("web", &[], pods("p", 150)).writes;
        let plan = plan_slices("web", &first, pods("p", 100));
        assert_eq!(plan.deletes, ["web-1"]);
        assert!(plan.writes.is_empty());
        // Slices "web-1" gone: 150 pods again make it again.
        let plan = plan_slices("web", &first[..1], pods("p", 150));
        assert_eq!(plan.writes.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["web-1"]);
    }

    #[test]
    fn a_pod_listed_twice_by_someone_else_is_kept_once() {
        let existing = vec![
            ("web-0".to_string(), vec![pod("a", "prod"), pod("b", "prod")]),
            ("web-1".to_string(), vec![pod("a", "prod")]),
        ];
        let plan = plan_slices("web", &existing, vec![pod("a", "prod"), pod("b", "prod")]);
        assert!(plan.writes.is_empty());
        assert_eq!(plan.deletes, ["web-1"]);
    }
}
