//! The EndpointSlice cache, indexed by the Service each slice belongs to.
//!
//! A reconcile needs the slices of one Service. A reflector store can only
//! hand out all of them (`Store::state` clones an `Arc` per slice in the
//! cluster) to be filtered, so every reconcile cost O(all slices): at 5,000
//! Services, the controller's start was quadratic. Here a lookup costs the
//! Service's own slices.

use std::collections::HashMap;
use std::sync::Arc;

use futures::Stream;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher;

use super::indexed::{reflect_indexed, Index, Indexed};
use super::{strip, SERVICE_NAME_LABEL};
use crate::metrics::Metrics;

/// A Service: (namespace, name).
type ServiceKey = (Box<str>, Box<str>);

/// Slices by Service, and which Service each slice is filed under.
#[derive(Debug, Default)]
pub struct Slices {
    /// The slices of each Service, by slice name.
    by_service: HashMap<ServiceKey, HashMap<Box<str>, Arc<EndpointSlice>>>,
    /// The Service each slice (namespace, slice name) is filed under: a slice
    /// whose service-name label changes must leave its old Service.
    service_of: HashMap<(Box<str>, Box<str>), Box<str>>,
}

impl Index for Slices {
    type Object = EndpointSlice;
    const KIND: &'static str = "EndpointSlice";

    fn prepare(slice: &mut EndpointSlice) {
        strip(slice);
    }

    /// File a copy of `slice` under its Service (replacing the version before).
    /// A copy, because a deserialised list has up to half its capacity spare
    /// (it grew by doubling) and a copy has none: at 50,000 endpoints that
    /// was about 10 MiB. A slice without name, namespace or service-name label
    /// is not kept (the watch selects on the label, so the API server sends
    /// none such).
    fn insert(&mut self, slice: EndpointSlice) -> bool {
        self.remove(&slice);
        let (Some(namespace), Some(name), Some(service)) =
            (slice.metadata.namespace.as_deref(), slice.metadata.name.as_deref(), service_of(&slice))
        else {
            return true;
        };
        let (namespace, name, service): (Box<str>, Box<str>, Box<str>) = (namespace.into(), name.into(), service.into());
        self.service_of.insert((namespace.clone(), name.clone()), service.clone());
        self.by_service.entry((namespace, service)).or_default().insert(name, Arc::new(slice.clone()));
        true
    }

    /// Forget `slice` (found by namespace and name, wherever it is filed).
    fn remove(&mut self, slice: &EndpointSlice) {
        let (Some(namespace), Some(name)) = (slice.metadata.namespace.as_deref(), slice.metadata.name.as_deref()) else {
            return;
        };
        let Some(service) = self.service_of.remove(&(namespace.into(), name.into())) else {
            return;
        };
        let key: ServiceKey = (namespace.into(), service);
        if let Some(slices) = self.by_service.get_mut(&key) {
            slices.remove(name);
            if slices.is_empty() {
                self.by_service.remove(&key);
            }
        }
    }

    fn len(&self) -> usize {
        self.service_of.len()
    }
}

/// The Service a slice belongs to: its `kubernetes.io/service-name` label.
fn service_of(slice: &EndpointSlice) -> Option<&str> {
    slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL).map(String::as_str)
}

/// Read access to the EndpointSlice cache. Cheap to clone.
pub type SliceCache = Indexed<Slices>;

impl Indexed<Slices> {
    /// The EndpointSlices of the Service `name` in `namespace`, in no
    /// particular order.
    pub fn slices_of(&self, namespace: &str, name: &str) -> Vec<Arc<EndpointSlice>> {
        self.read()
            .by_service
            .get(&(Box::from(namespace), Box::from(name)))
            .map(|of_service| of_service.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Call `f` with every cached slice, under the cache's read lock (watch
    /// updates wait meanwhile): for a periodic pass over all of them, without
    /// copying the set.
    pub fn with_all<R>(&self, f: impl FnOnce(&mut dyn Iterator<Item = &EndpointSlice>) -> R) -> R {
        let slices = self.read();
        let mut all = slices.by_service.values().flat_map(HashMap::values).map(Arc::as_ref);
        f(&mut all)
    }
}

/// The slice cache fed by `stream`, and the slices that changed (see [`reflect_indexed`]).
pub fn reflect_slices(
    stream: impl Stream<Item = watcher::Result<watcher::Event<EndpointSlice>>> + Send + 'static,
    metrics: Arc<Metrics>,
) -> (SliceCache, impl Stream<Item = Option<EndpointSlice>> + Send) {
    reflect_indexed(stream, metrics)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use k8s_openapi::api::discovery::v1::Endpoint;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn slice(namespace: &str, name: &str, service: &str, addresses: &[&str]) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                namespace: Some(namespace.into()),
                name: Some(name.into()),
                labels: Some([(SERVICE_NAME_LABEL.to_string(), service.to_string())].into()),
                resource_version: Some("7".into()),
                ..ObjectMeta::default()
            },
            address_type: "IPv4".into(),
            endpoints: Some(
                addresses.iter().map(|a| Endpoint { addresses: vec![a.to_string()], ..Endpoint::default() }).collect(),
            ),
            ports: None,
        }
    }

    fn run(events: Vec<watcher::Event<EndpointSlice>>) -> (SliceCache, Vec<Option<String>>) {
        let metrics = Arc::new(Metrics::new());
        let (cache, changes) = reflect_slices(futures::stream::iter(events.into_iter().map(Ok)), metrics);
        let changes = futures::executor::block_on(changes.map(|c| c.and_then(|s| s.metadata.name)).collect());
        (cache, changes)
    }

    /// The addresses of the slices of a Service, sorted.
    fn addresses(cache: &SliceCache, namespace: &str, service: &str) -> Vec<String> {
        let mut all: Vec<String> = cache
            .slices_of(namespace, service)
            .iter()
            .flat_map(|s| s.endpoints.iter().flatten().flat_map(|e| e.addresses.clone()))
            .collect();
        all.sort();
        all
    }

    #[test]
    fn a_service_gets_only_its_own_slices() {
        let (cache, changes) = run(vec![
            watcher::Event::Init,
            watcher::Event::InitApply(slice("shop", "web-a", "web", &["10.0.0.1"])),
            watcher::Event::InitApply(slice("shop", "web-b", "web", &["10.0.0.2"])),
            watcher::Event::InitApply(slice("shop", "db-a", "db", &["10.0.0.3"])),
            // The same Service name in another namespace is another Service.
            watcher::Event::InitApply(slice("blog", "web-a", "web", &["10.0.1.1"])),
            watcher::Event::InitDone,
        ]);
        assert_eq!(changes, [None]);
        assert!(cache.is_ready());
        assert_eq!(cache.len(), 4);
        assert_eq!(addresses(&cache, "shop", "web"), ["10.0.0.1", "10.0.0.2"]);
        assert_eq!(addresses(&cache, "shop", "db"), ["10.0.0.3"]);
        assert_eq!(addresses(&cache, "blog", "web"), ["10.0.1.1"]);
        assert!(cache.slices_of("blog", "db").is_empty());
    }

    #[test]
    fn changes_replace_move_and_delete_slices() {
        let (cache, changes) = run(vec![
            watcher::Event::Init,
            watcher::Event::InitApply(slice("shop", "web-a", "web", &["10.0.0.1"])),
            watcher::Event::InitApply(slice("shop", "web-b", "web", &["10.0.0.2"])),
            watcher::Event::InitDone,
            // A new version of a slice replaces the old one.
            watcher::Event::Apply(slice("shop", "web-a", "web", &["10.0.0.1", "10.0.0.9"])),
            // A slice relabelled to another Service leaves the first.
            watcher::Event::Apply(slice("shop", "web-b", "api", &["10.0.0.2"])),
            watcher::Event::Delete(slice("shop", "web-a", "web", &[])),
        ]);
        assert_eq!(changes, [None, Some("web-a".into()), Some("web-b".into()), Some("web-a".into())]);
        assert_eq!(cache.len(), 1);
        assert!(cache.slices_of("shop", "web").is_empty());
        assert_eq!(addresses(&cache, "shop", "api"), ["10.0.0.2"]);
        // Bookkeeping is not cached.
        assert_eq!(cache.slices_of("shop", "api")[0].metadata.resource_version, None);
    }

    #[test]
    fn a_relist_replaces_everything_at_once() {
        let (cache, _) = run(vec![
            watcher::Event::Init,
            watcher::Event::InitApply(slice("shop", "old", "web", &["10.0.0.1"])),
            watcher::Event::InitDone,
            watcher::Event::Init,
            watcher::Event::InitApply(slice("shop", "new", "web", &["10.0.0.2"])),
            watcher::Event::InitDone,
        ]);
        assert_eq!(cache.len(), 1);
        assert_eq!(addresses(&cache, "shop", "web"), ["10.0.0.2"]);
        let all = cache.with_all(|slices| slices.filter_map(|s| s.metadata.name.clone()).collect::<Vec<_>>());
        assert_eq!(all, ["new"]);
    }

    #[test]
    fn not_ready_before_the_first_list() {
        let metrics = Arc::new(Metrics::new());
        let (cache, changes) = reflect_slices(futures::stream::iter(vec![Ok(watcher::Event::Init)]), metrics);
        futures::executor::block_on(changes.collect::<Vec<_>>());
        assert!(!cache.is_ready());
        assert!(futures::executor::block_on(cache.wait_until_ready()).is_err(), "the writer is gone");
    }
}
