//! The controller's pod cache: for each pod, its labels, creation time and
//! since when it has been Ready, and nothing else. (Agents do not watch pods:
//! the controller publishes this much of the pods behind WeightedServices in
//! PodInfoSlices, [`super::PodInfoCache`].)
//!
//! A reflector store of whole pods costs several KiB per pod even trimmed.
//! Here the pods of one ReplicaSet share one label map (they have the same
//! labels), and a pod costs its name, a pointer and two times.

use std::collections::HashMap;
use std::sync::Arc;

use futures::Stream;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::watcher;

use super::indexed::{reflect_indexed, Index, Indexed};
use super::Trim;
use crate::metrics::Metrics;
use crate::snapshot::{LabelSets, Labels, PodMeta};

/// Every this many changes, label maps no pod has any more are dropped.
const PRUNE_EVERY: u64 = 4096;

/// Since when `pod` has been Ready (its Ready condition's `lastTransitionTime`).
fn ready_since(pod: &Pod) -> Option<Timestamp> {
    let ready = pod.status.as_ref()?.conditions.as_ref()?.iter().find(|c| c.type_ == "Ready")?;
    (ready.status == "True").then_some(())?;
    ready.last_transition_time.as_ref().map(|t| t.0)
}

/// One pod, as cached.
#[derive(Debug, Clone)]
struct Entry {
    labels: Arc<Labels>,
    created: Option<Timestamp>,
    ready_since: Option<Timestamp>,
}

/// Pods by namespace and name, and the label maps they share.
#[derive(Debug, Default)]
pub struct Pods {
    by_namespace: HashMap<Box<str>, HashMap<Box<str>, Entry>>,
    len: usize,
    label_sets: LabelSets,
}

impl Index for Pods {
    type Object = Pod;
    const KIND: &'static str = "Pod";

    fn prepare(pod: &mut Self::Object) {
        pod.trim();
    }

    /// False when the pod's labels, creation and ready-since time are as
    /// before: most pod updates (status, container restarts) change none.
    fn insert(&mut self, pod: Self::Object) -> bool {
        let ready_since = ready_since(&pod);
        let meta = pod.metadata;
        let (Some(namespace), Some(name)) = (meta.namespace, meta.name) else {
            return true;
        };
        let entry = Entry {
            labels: self.label_sets.share(meta.labels.unwrap_or_default()),
            created: meta.creation_timestamp.map(|t| t.0),
            ready_since,
        };
        let pods = self.by_namespace.entry(namespace.into_boxed_str()).or_default();
        match pods.insert(name.into_boxed_str(), entry.clone()) {
            None => {
                self.len += 1;
                true
            }
            Some(before) => {
                !(Arc::ptr_eq(&before.labels, &entry.labels)
                    && before.created == entry.created
                    && before.ready_since == entry.ready_since)
            }
        }
    }

    fn remove(&mut self, pod: &Self::Object) {
        let meta = &pod.metadata;
        let (Some(namespace), Some(name)) = (meta.namespace.as_deref(), meta.name.as_deref())
        else {
            return;
        };
        if let Some(pods) = self.by_namespace.get_mut(namespace) {
            if pods.remove(name).is_some() {
                self.len -= 1;
            }
            if pods.is_empty() {
                self.by_namespace.remove(namespace);
            }
        }
    }

    fn len(&self) -> usize {
        self.len
    }

    fn changed(&mut self) {
        self.label_sets.changed(PRUNE_EVERY);
    }

    fn relisted(&mut self) {
        // A relist's label maps were shared with the set it replaced until now.
        self.label_sets.prune();
    }
}

/// Read access to the controller's pod cache. Cheap to clone.
pub type FullPodCache = Indexed<Pods>;

impl Indexed<Pods> {
    /// Labels, creation time and (from whole pods) ready-since time of a pod.
    pub fn get(&self, namespace: &str, name: &str) -> Option<PodMeta> {
        let pods = self.read();
        let entry = pods.by_namespace.get(namespace)?.get(name)?;
        Some(PodMeta {
            labels: entry.labels.clone(),
            created: entry.created,
            ready_since: entry.ready_since,
        })
    }

    /// The pods of `namespace` for which `keep(labels)` is true, by name.
    pub fn matching(&self, namespace: &str, keep: impl Fn(&Labels) -> bool) -> Vec<(String, PodMeta)> {
        let pods = self.read();
        let Some(in_namespace) = pods.by_namespace.get(namespace) else { return Vec::new() };
        in_namespace
            .iter()
            .filter(|(_, entry)| keep(&entry.labels))
            .map(|(name, entry)| {
                (name.to_string(), PodMeta { labels: entry.labels.clone(), created: entry.created, ready_since: entry.ready_since })
            })
            .collect()
    }

    /// How many distinct label maps the cached pods have.
    pub fn label_sets(&self) -> usize {
        self.read().label_sets.len()
    }
}

/// The pod cache fed by `stream`, and the pods that changed (see [`reflect_indexed`]).
pub fn reflect_pods(
    stream: impl Stream<Item = watcher::Result<watcher::Event<Pod>>> + Send + 'static,
    metrics: Arc<Metrics>,
) -> (FullPodCache, impl Stream<Item = Option<Pod>> + Send) {
    reflect_indexed(stream, metrics)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    fn pod(namespace: &str, name: &str, labels: &[(&str, &str)]) -> Pod {
        Pod {
            metadata: ObjectMeta {
                namespace: Some(namespace.into()),
                name: Some(name.into()),
                labels: Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
                creation_timestamp: Some(Time(Timestamp::UNIX_EPOCH)),
                uid: Some("0a6c2c1e-uid".into()),
                ..ObjectMeta::default()
            },
            ..Pod::default()
        }
    }

    fn run(events: Vec<watcher::Event<Pod>>) -> (FullPodCache, Vec<Option<String>>) {
        let metrics = Arc::new(Metrics::new());
        let (cache, changes) = reflect_pods(futures::stream::iter(events.into_iter().map(Ok)), metrics);
        let changes: Vec<Option<String>> =
            futures::executor::block_on(changes.map(|c| c.and_then(|p| p.metadata.name)).collect());
        (cache, changes)
    }

    #[test]
    fn pods_of_one_replica_set_share_their_labels_and_are_found_by_name() {
        let web = [("app", "web"), ("env", "prod")];
        let (cache, changes) = run(vec![
            watcher::Event::Init,
            watcher::Event::InitApply(pod("shop", "web-1", &web)),
            watcher::Event::InitApply(pod("shop", "web-2", &web)),
            watcher::Event::InitApply(pod("blog", "web-1", &[("app", "blog")])),
            watcher::Event::InitDone,
            watcher::Event::Apply(pod("shop", "web-3", &web)),
            watcher::Event::Delete(pod("shop", "web-1", &web)),
        ]);
        assert_eq!(changes, [None, Some("web-3".into()), Some("web-1".into())]);
        assert!(futures::executor::block_on(cache.wait_until_ready()).is_ok());
        assert_eq!(cache.len(), 3);
        assert!(cache.get("shop", "web-1").is_none(), "deleted");
        let (a, b) = (cache.get("shop", "web-2").expect("web-2"), cache.get("shop", "web-3").expect("web-3"));
        assert!(Arc::ptr_eq(&a.labels, &b.labels), "one map for the same labels");
        assert_eq!(a.labels.get("env").map(String::as_str), Some("prod"));
        assert_eq!(a.created, Some(Timestamp::UNIX_EPOCH));
        assert_eq!(cache.get("blog", "web-1").expect("blog's").labels.get("app").map(String::as_str), Some("blog"));
        assert_eq!(cache.label_sets(), 2);
    }

    #[test]
    fn an_update_that_changes_nothing_kept_is_not_passed_on() {
        let (cache, changes) = run(vec![
            watcher::Event::Init,
            watcher::Event::InitApply(pod("shop", "web-1", &[("app", "web")])),
            watcher::Event::InitDone,
            // A status update: the metadata kept is the same.
            watcher::Event::Apply(pod("shop", "web-1", &[("app", "web")])),
            watcher::Event::Apply(pod("shop", "web-1", &[("app", "web"), ("env", "canary")])),
            watcher::Event::Apply(pod("shop", "web-2", &[("app", "web")])),
            watcher::Event::Delete(pod("shop", "web-2", &[("app", "web")])),
        ]);
        assert_eq!(changes, [None, Some("web-1".into()), Some("web-2".into()), Some("web-2".into())]);
        assert_eq!(cache.len(), 1);
        let matching = cache.matching("shop", |labels| labels.get("env").is_some());
        assert_eq!(matching.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["web-1"]);
        assert!(cache.matching("blog", |_| true).is_empty());
    }

    #[test]
    fn a_relist_replaces_everything_at_once_and_label_maps_no_pod_has_go() {
        let (cache, _) = run(vec![
            watcher::Event::Init,
            watcher::Event::InitApply(pod("shop", "old", &[("app", "old")])),
            watcher::Event::InitDone,
            watcher::Event::Init,
            watcher::Event::InitApply(pod("shop", "new", &[("app", "new")])),
            watcher::Event::InitDone,
        ]);
        assert_eq!(cache.len(), 1);
        assert!(cache.get("shop", "old").is_none(), "not in the new list");
        assert!(cache.get("shop", "new").is_some());
        assert_eq!(cache.label_sets(), 1);
    }

    #[test]
    fn not_ready_before_the_first_list() {
        let metrics = Arc::new(Metrics::new());
        let (cache, changes) = reflect_pods(
            futures::stream::iter(vec![Ok(watcher::Event::<Pod>::Init)]),
            metrics,
        );
        futures::executor::block_on(changes.collect::<Vec<_>>());
        assert!(!cache.is_ready());
        assert!(futures::executor::block_on(cache.wait_until_ready()).is_err(), "the writer is gone");
    }
}
