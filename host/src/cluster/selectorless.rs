//! EndpointSlices of WeightedServices without a selector.
//!
//! The agent watches EndpointSlices by the label `codesink.net/weighted-service`,
//! which the EndpointSlice controller copies from the Services the controller
//! owns: the slices of other Services (nearly all of a cluster's) never reach
//! it. A Service without a selector has no slices from that controller: their
//! owner writes them, with the `kubernetes.io/service-name` label but not ours.
//! For those WeightedServices only, a second watch selects the slices by
//! Service name (`kubernetes.io/service-name in (…)`); it is started again
//! whenever the set of such names changes, and not at all while there is none.

use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};

use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};

use super::{reflect_slices, watch_config, Change, SliceCache, OWNER_LABEL, SERVICE_NAME_LABEL};
use crate::crd::WeightedService;
use crate::metrics::Metrics;

/// The fallback watch's cache, and the Service names it covers.
#[derive(Clone, Default)]
pub struct SelectorlessSlices(Arc<RwLock<Option<Covered>>>);

/// The Service names a fallback watch covers, and its cache.
type Covered = (BTreeSet<String>, SliceCache);

impl SelectorlessSlices {
    /// The slices of Service `name` in `namespace` from the fallback watch:
    /// `None` while the watch that covers that name has not listed yet (an
    /// empty list then would read as "no endpoints").
    pub fn slices_of(&self, namespace: &str, name: &str) -> Option<Vec<Arc<EndpointSlice>>> {
        let guard = self.0.read().unwrap_or_else(|p| p.into_inner());
        let (names, cache) = guard.as_ref()?;
        (names.contains(name) && cache.is_ready()).then(|| cache.slices_of(namespace, name))
    }

    /// Call `f` with every slice of the fallback watch.
    pub fn with_all<R>(&self, f: impl FnOnce(&mut dyn Iterator<Item = &EndpointSlice>) -> R) -> R {
        let guard = self.0.read().unwrap_or_else(|p| p.into_inner());
        match guard.as_ref() {
            Some((_, cache)) => cache.with_all(f),
            None => f(&mut std::iter::empty()),
        }
    }

    /// How many slices the fallback watch has.
    pub fn len(&self) -> usize {
        self.0.read().unwrap_or_else(|p| p.into_inner()).as_ref().map_or(0, |(_, cache)| cache.len())
    }

    /// Whether it has none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The names of the WeightedServices without a selector (their Services' names).
pub fn selectorless_names<'a>(weighted_services: impl IntoIterator<Item = &'a WeightedService>) -> BTreeSet<String> {
    weighted_services
        .into_iter()
        .filter(|ws| ws.spec.service.selector.as_ref().is_none_or(|s| s.is_empty()))
        .map(|ws| ws.name_any())
        .collect()
}

/// The label selector of the fallback watch for `names`: their slices, but
/// not those the main watch has.
fn label_selector(names: &BTreeSet<String>) -> String {
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    format!("{SERVICE_NAME_LABEL} in ({}),!{OWNER_LABEL}", names.join(","))
}

/// Drive the fallback watch: (re)start it each time `names` sends a new set
/// (none while the set is empty), passing its changes to `changed`. Runs until
/// `names`' sender is dropped.
pub async fn drive(
    client: Client,
    slices: SelectorlessSlices,
    mut names: tokio::sync::watch::Receiver<BTreeSet<String>>,
    metrics: Arc<Metrics>,
    changed: Arc<dyn Fn(Change) + Send + Sync>,
) {
    loop {
        let current = names.borrow_and_update().clone();
        let running = if current.is_empty() {
            *slices.0.write().unwrap_or_else(|p| p.into_inner()) = None;
            None
        } else {
            let config = watch_config().labels(&label_selector(&current));
            let (cache, stream) = reflect_slices(watcher(Api::<EndpointSlice>::all(client.clone()), config), metrics.clone());
            *slices.0.write().unwrap_or_else(|p| p.into_inner()) = Some((current.clone(), cache));
            tracing::info!(services = ?current, "watching the EndpointSlices of WeightedServices without a selector");
            let changed = changed.clone();
            Some(tokio::spawn(stream.for_each(move |slice| {
                if let Some(change) = super::slice_change(slice) {
                    changed(change);
                }
                async {}
            })))
        };
        let ended = names.changed().await.is_err();
        if let Some(task) = running {
            task.abort();
        }
        if ended {
            return;
        }
        // The names changed: the WeightedServices they cover are looked at again once the new watch lists.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_weighted_services_without_a_selector_need_the_fallback() {
        let ws = |name: &str, selector: serde_json::Value| -> WeightedService {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "codesink.net/v1alpha1", "kind": "WeightedService",
                "metadata": {"name": name, "namespace": "shop"}, "spec": {"selector": selector},
            }))
            .expect("a WeightedService")
        };
        let all = [ws("web", serde_json::json!({"app": "web"})), ws("external", serde_json::Value::Null), ws("db", serde_json::json!({}))];
        let names = selectorless_names(&all);
        assert_eq!(names.iter().map(String::as_str).collect::<Vec<_>>(), ["db", "external"]);
        assert_eq!(label_selector(&names), "kubernetes.io/service-name in (db,external),!codesink.net/weighted-service");
        let empty = SelectorlessSlices::default();
        assert!(empty.slices_of("shop", "db").is_none(), "not covered yet");
        assert!(empty.is_empty());
    }
}
