//! The PodInfoSlice cache: what the controller published of the pods behind
//! each WeightedService (labels, creation and ready-since times), filed by
//! WeightedService and slice, for the agent's lookups by pod name and the
//! controller's comparison with what it would publish now.
//!
//! Agents used to watch every pod's metadata: every pod status update in the
//! cluster reached every node. The controller, one process, watches pods and
//! writes a slice only when what agents read of it changes ([`crate::pod_info`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use futures::Stream;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::watcher;

use super::indexed::{reflect_indexed, Index, Indexed};
use super::OWNER_LABEL;
use crate::crd::{PodInfo, PodInfoSlice};
use crate::metrics::Metrics;
use crate::snapshot::{LabelSets, PodMeta};

/// Every this many changes, label maps no pod has any more are dropped.
const PRUNE_EVERY: u64 = 1024;

/// One slice's pods, by name.
type SlicePods = HashMap<Box<str>, PodMeta>;

/// A WeightedService's slices, by name.
type WsSlices = BTreeMap<Box<str>, SlicePods>;

/// Slices by namespace and WeightedService (nested, so that a lookup by
/// `&str`, once per endpoint in the agent's snapshots, allocates nothing),
/// their pods by name.
#[derive(Debug, Default)]
pub struct PodInfos {
    by_ws: HashMap<Box<str>, HashMap<Box<str>, WsSlices>>,
    /// The WeightedService each slice (namespace, slice name) is filed under.
    ws_of: HashMap<(Box<str>, Box<str>), Box<str>>,
    label_sets: LabelSets,
}

impl Index for PodInfos {
    type Object = PodInfoSlice;
    const KIND: &'static str = "PodInfoSlice";

    /// Nothing but the name, namespace, owner label and pods is read; they are
    /// copied out at insert, so the object itself is not kept.
    fn prepare(_: &mut PodInfoSlice) {}

    fn insert(&mut self, slice: PodInfoSlice) -> bool {
        self.remove(&slice);
        let (Some(namespace), Some(name), Some(ws)) =
            (slice.metadata.namespace.as_deref(), slice.metadata.name.as_deref(), ws_of(&slice))
        else {
            return true;
        };
        let (namespace, name, ws): (Box<str>, Box<str>, Box<str>) = (namespace.into(), name.into(), ws.into());
        let sets: Vec<_> = slice.spec.label_sets.into_iter().map(|labels| self.label_sets.share(labels)).collect();
        let pods = slice
            .spec
            .pods
            .into_iter()
            .filter_map(|pod| {
                // A pod left out is unknown: the agent weights it without labels after a while, with an Event.
                let Some(labels) = sets.get(pod.label_set as usize) else {
                    tracing::warn!(
                        namespace = %namespace, slice = %name, pod = %pod.name, label_set = pod.label_set, sets = sets.len(),
                        "a PodInfoSlice entry names a label set the slice lacks; the pod is left out"
                    );
                    return None;
                };
                let meta =
                    PodMeta { labels: labels.clone(), created: pod.created.map(|t| t.0), ready_since: pod.ready_since.map(|t| t.0) };
                Some((pod.name.into_boxed_str(), meta))
            })
            .collect();
        self.ws_of.insert((namespace.clone(), name.clone()), ws.clone());
        self.by_ws.entry(namespace).or_default().entry(ws).or_default().insert(name, pods);
        true
    }

    fn remove(&mut self, slice: &PodInfoSlice) {
        let (Some(namespace), Some(name)) = (slice.metadata.namespace.as_deref(), slice.metadata.name.as_deref()) else {
            return;
        };
        let Some(ws) = self.ws_of.remove(&(namespace.into(), name.into())) else {
            return;
        };
        let Some(in_namespace) = self.by_ws.get_mut(namespace) else { return };
        if let Some(slices) = in_namespace.get_mut(&ws) {
            slices.remove(name);
            if slices.is_empty() {
                in_namespace.remove(&ws);
            }
        }
        if in_namespace.is_empty() {
            self.by_ws.remove(namespace);
        }
    }

    fn len(&self) -> usize {
        self.ws_of.len()
    }

    fn changed(&mut self) {
        self.label_sets.changed(PRUNE_EVERY);
    }

    fn relisted(&mut self) {
        self.label_sets.prune();
    }
}

/// The WeightedService a slice belongs to: its `codesink.net/weighted-service` label.
fn ws_of(slice: &PodInfoSlice) -> Option<&str> {
    slice.metadata.labels.as_ref()?.get(OWNER_LABEL).map(String::as_str)
}

/// Read access to the PodInfoSlice cache. Cheap to clone.
pub type PodInfoCache = Indexed<PodInfos>;

impl Indexed<PodInfos> {
    /// What the slices of WeightedService `ws` in `namespace` say of pod `pod`.
    pub fn get(&self, namespace: &str, ws: &str, pod: &str) -> Option<PodMeta> {
        let infos = self.read();
        infos.by_ws.get(namespace)?.get(ws)?.values().find_map(|pods| pods.get(pod)).cloned()
    }

    /// The slices of WeightedService `ws` in `namespace`, sorted by name, with
    /// their pods (sorted by name) as the controller wrote them.
    pub fn slices_of(&self, namespace: &str, ws: &str) -> Vec<(String, Vec<PodInfo>)> {
        let infos = self.read();
        let Some(slices) = infos.by_ws.get(namespace).and_then(|n| n.get(ws)) else {
            return Vec::new();
        };
        slices
            .iter()
            .map(|(name, pods)| {
                let mut pods: Vec<PodInfo> = pods
                    .iter()
                    .map(|(pod, meta)| PodInfo {
                        name: pod.to_string(),
                        labels: meta.labels.as_ref().clone(),
                        created: meta.created.map(Time),
                        ready_since: meta.ready_since.map(Time),
                    })
                    .collect();
                pods.sort_by(|a, b| a.name.cmp(&b.name));
                (name.to_string(), pods)
            })
            .collect()
    }
}

/// The PodInfoSlice cache fed by `stream`, and the slices that changed (see [`reflect_indexed`]).
pub fn reflect_pod_infos(
    stream: impl Stream<Item = watcher::Result<watcher::Event<PodInfoSlice>>> + Send + 'static,
    metrics: Arc<Metrics>,
) -> (PodInfoCache, impl Stream<Item = Option<PodInfoSlice>> + Send) {
    reflect_indexed(stream, metrics)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use k8s_openapi::jiff::Timestamp;

    pub(crate) fn slice(namespace: &str, name: &str, ws: &str, pods: &[(&str, &str)]) -> PodInfoSlice {
        PodInfoSlice {
            metadata: ObjectMeta {
                namespace: Some(namespace.into()),
                name: Some(name.into()),
                labels: Some([(OWNER_LABEL.to_string(), ws.to_string())].into()),
                ..ObjectMeta::default()
            },
            spec: crate::crd::PodInfoSliceSpec::from_pods(
                pods.iter()
                    .map(|(pod, env)| PodInfo {
                        name: pod.to_string(),
                        labels: [("env".to_string(), env.to_string())].into(),
                        created: Some(Time(Timestamp::UNIX_EPOCH)),
                        ready_since: None,
                    })
                    .collect(),
            ),
        }
    }

    fn run(events: Vec<watcher::Event<PodInfoSlice>>) -> (PodInfoCache, Vec<Option<String>>) {
        let metrics = Arc::new(Metrics::new());
        let (cache, changes) = reflect_pod_infos(futures::stream::iter(events.into_iter().map(Ok)), metrics);
        let changes = futures::executor::block_on(changes.map(|c| c.and_then(|s| s.metadata.name)).collect());
        (cache, changes)
    }

    #[test]
    fn an_entry_naming_a_missing_label_set_leaves_only_that_pod_out() {
        let mut bad = slice("shop", "web-0", "web", &[("web-a", "prod"), ("web-b", "canary")]);
        bad.spec.pods[1].label_set = 7;
        let (cache, _) = run(vec![watcher::Event::Init, watcher::Event::InitApply(bad), watcher::Event::InitDone]);
        assert!(cache.get("shop", "web", "web-b").is_none(), "no labels to give it");
        assert_eq!(cache.get("shop", "web", "web-a").expect("web-a").labels.get("env").map(String::as_str), Some("prod"));
    }

    #[test]
    fn pods_are_found_through_their_weighted_services_slices() {
        let (cache, changes) = run(vec![
            watcher::Event::Init,
            watcher::Event::InitApply(slice("shop", "web-0", "web", &[("web-a", "prod"), ("web-b", "canary")])),
            watcher::Event::InitApply(slice("shop", "web-1", "web", &[("web-c", "prod")])),
            watcher::Event::InitApply(slice("blog", "web-0", "web", &[("web-a", "blog")])),
            watcher::Event::InitDone,
            watcher::Event::Apply(slice("shop", "web-1", "web", &[("web-c", "canary")])),
            watcher::Event::Delete(slice("shop", "web-0", "web", &[])),
        ]);
        assert_eq!(changes, [None, Some("web-1".into()), Some("web-0".into())]);
        assert_eq!(cache.len(), 2);
        assert!(cache.get("shop", "web", "web-a").is_none(), "its slice was deleted");
        let c = cache.get("shop", "web", "web-c").expect("web-c");
        assert_eq!(c.labels.get("env").map(String::as_str), Some("canary"), "the newer version");
        assert_eq!(c.created, Some(Timestamp::UNIX_EPOCH));
        assert_eq!(cache.get("blog", "web", "web-a").expect("blog's").labels.get("env").map(String::as_str), Some("blog"));
        assert!(cache.get("shop", "api", "web-c").is_none(), "only through its own WeightedService");
        let slices = cache.slices_of("shop", "web");
        assert_eq!(slices.len(), 1);
        assert_eq!(slices[0].0, "web-1");
        assert_eq!(slices[0].1[0].name, "web-c");
    }
}
